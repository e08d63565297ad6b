"""Toy world: drawn 64 px coloured shapes with captions, the styles and their statistics, and a content scorer.

Everything here is numpy + Pillow (no torch), so datasets, tests and the GUI demo can use it cheaply.

* The **world**: one circle, square or triangle (apex up) in one of five colours on a plain, light, slightly
  tinted background, at a random position and size (radius 8-22 px). Drawn at 4x and box-downscaled, so
  edges are anti-aliased. Captions come from varied templates with colour and shape words in different
  places (``caption``), so a text encoder trained on them reads words, not positions.
* **Styles** the toy base never sees: ``"stripes"`` (dark diagonal bars) and ``"dots"`` (a lattice of dark
  dots), drawn over the whole picture. Each has a scalar **style statistic** (``style_statistic``): the
  luminance contrast of the pattern, measured on the background only, phase-invariant, about 0 for a plain
  picture and about 150-200 for a styled one. The two statistics do not see each other's pattern.
* **Shape styles** (``SHAPE_STYLES``): ``"outline"`` (a dark band 2 px wide around the shape) and ``"shadow"``
  (a grey copy of the shape 4 px down and right). They leave the background plain, and the toy VAE keeps
  the content under them (95-100% shape after a round trip, against about 50% under the patterns). Their
  statistics (``outline_statistic``, ``shadow_statistic``) measure darkness next to the shape's core and
  do not see each other.
* **Tint style** (``TINT_STYLES``): ``"paper"``, a warm paper tint of the whole background (the shape keeps its
  colour). Its statistic (``paper_statistic``) is the background's warmth. It combines with any other style:
  ``render(d, "shadow+paper")`` draws a drop shadow on paper, and neither statistic sees the other, so two style
  LoRAs mixed (a shadow LoRA and a paper LoRA) can be scored against pictures drawn with both.
* The **scorer** (``score_image``) reads colour and shape back from any picture, generated or drawn, styled
  or not: colour is the hue of saturated, not-dark pixels; shape comes from the row-width profile of those
  pixels (fill ratio, top against bottom width). It scores 100% on drawn pictures, with or without a style.
* The **style suite** (``STYLE_KINDS``, docs/toyworld-suite.md) adds a cool colour ``grade`` of the whole picture,
  two elements at a fixed place under the shape (a ``ground`` line across the picture's foot, a corner ``badge``) and
  a ``punched`` shape (a dark hole at its centroid), each with its own statistic; ``HELD_OUT`` names three styles
  a recipe is not tuned on.
* ``make_dataset`` writes PNG + same-stem ``.txt`` caption folders, the layout the trainer reads.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64            # final picture side, px
SUPERSAMPLE = 4      # drawn at 4x and box-downscaled

#: Canonical colours (RGB) and their hues in degrees. Hues are at least 50 degrees apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "yellow": (235, 200, 30),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (150, 50, 200),
}
COLOUR_JITTER = 16   # +- per channel
SHAPES = ("circle", "square", "triangle")
RADIUS_RANGE = (8.0, 22.0)
STYLES = ("stripes", "dots")              # patterns over the whole picture
SHAPE_STYLES = ("outline", "shadow")      # marks that follow the shape: an ink outline, a drop shadow
TINT_STYLES = ("paper",)                  # a warm tint of the whole background
GRADE_STYLES = ("grade",)                 # a cool colour grade of the whole picture, shape included
PLACED_STYLES = ("ground", "badge")       # elements at a fixed place: a ground line across the foot, a corner badge
RENDERING_STYLES = ("punched",)           # the shape's own rendering: a dark hole punched through its centre
ALL_STYLES = STYLES + SHAPE_STYLES + TINT_STYLES + GRADE_STYLES + PLACED_STYLES + RENDERING_STYLES
#: The style suite (issue 19): every style and its kind. A recipe is judged on all of them.
STYLE_KINDS = {"stripes": "texture", "dots": "texture", "outline": "shape-following", "shadow": "shape-following",
               "paper": "tint", "grade": "colour grade", "ground": "position-bound", "badge": "position-bound",
               "punched": "shape rendering"}
#: Held out while the recipe is tuned: designed with the others, their results looked at only once the recipe is
#: fixed (one of each of three kinds), so the suite's verdict is not a verdict on styles the recipe was fitted to.
HELD_OUT = ("dots", "grade", "badge")

# Style geometry, in final-picture pixels.
STRIPE_PERIOD = 16   # along x + y (diagonal bars; perpendicular spacing 16 / sqrt 2 = 11.3 px)
STRIPE_WIDTH = 6     # along x + y (perpendicular thickness 4.2 px)
DOT_PERIOD = 10      # square lattice; 10 does not divide 16, so dots and stripes do not alias
DOT_RADIUS = 2.5
DARK = (28, 26, 32)
OUTLINE_WIDTH = 2    # px, drawn outside the shape's edge
SHADOW_OFFSET = 4    # px, down and to the right
SHADOW = (62, 60, 72)
GROUND_Y, GROUND_WIDTH = 56, 3   # px: a grey line across the whole picture at this height, under the shape
BADGE_AT, BADGE_SIZE = (5, 5), 6   # px: a dark square badge near the top-left corner, under the shape
GRADE = (0.88, 0.96, 1.07)        # per channel, the whole picture: a cool grade (background about 35 bluer)
PUNCH_RADIUS = 3.0   # px, the dark hole at the shape's centre (its centroid: a triangle's is below its middle)
PAPER_TINT = (1.0, 0.965, 0.86)   # per channel, times the background's grey level: HSV saturation 0.14, hue 40 deg
PALE_MAX_SATURATION = 0.2         # VAE training: pale backgrounds of any hue up to this saturation

# Caption templates: colour and shape words move around; fillers vary the length.
_TEMPLATES = (
    "{a} {c} {s}",
    "{c} {s}",
    "a {c} {s}",
    "a picture of a {c} {s}",
    "a drawing of a {c} {s}",
    "an image of a {c} {s}",
    "a {s} in {c}",
    "a {s}, {c}",
    "{s}, {c}",
    "{c}, {s}",
    "a {s} that is {c}",
    "the {s} is {c}",
    "a {c} {s} on a plain background",
    "a simple {c} {s}",
    "a flat {c} {s} shape",
    "{c} {s}, simple drawing",
    "a {s} coloured {c}",
    "one {c} {s}",
    "a small drawing, {c} {s}",
    "plain background with a {c} {s}",
)
#: Every word the templates use (the toy tokenizer gives each one token).
FILLER_WORDS = ("a", "an", "the", "of", "in", "on", "is", "that", "with", "one", "picture", "drawing",
                "image", "plain", "background", "simple", "flat", "shape", "coloured", "small", "style")

_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


@dataclass(frozen=True)
class Drawing:
    """One toy-world picture's content: what ``render`` draws and ``caption`` describes."""
    colour: str
    shape: str
    cx: float           # centre, final-picture px
    cy: float
    radius: float       # half the shape's extent, px
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]


def _rng(seed_or_rng) -> np.random.Generator:
    return seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)


def sample_drawing(rng, colour: str | None = None, shape: str | None = None) -> Drawing:
    """A random drawing (colour and shape may be fixed)."""
    rng = _rng(rng)
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour or shape: {colour!r}, {shape!r}")
    r = float(rng.uniform(*RADIUS_RANGE))
    m = r + 2.0
    cx, cy = float(rng.uniform(m, SIZE - m)), float(rng.uniform(m, SIZE - m))
    rgb = tuple(int(np.clip(v + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for v in COLOURS[colour])
    base = int(rng.integers(222, 249))
    bg = tuple(int(np.clip(base + rng.integers(-14, 7), 0, 255)) for _ in range(3))
    return Drawing(colour, shape, cx, cy, r, rgb, bg)


def _shape_polygon(d: Drawing, k: float):
    cx, cy, r = d.cx * k, d.cy * k, d.radius * k
    if d.shape == "square":
        s = r * 0.88  # about a circle's area
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if d.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, d: Drawing, **paint) -> None:
    """Draw the drawing's shape on a 4x canvas (``paint``: Pillow's fill / outline / width)."""
    k = SUPERSAMPLE
    poly = _shape_polygon(d, k)
    if poly is None:
        cx, cy, r = d.cx * k, d.cy * k, d.radius * k
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **paint)
    else:
        draw.polygon(poly, **paint)


def _draw_big(d: Drawing) -> Image.Image:
    k = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * k, SIZE * k), d.background)
    _draw_shape(ImageDraw.Draw(img), d, fill=d.rgb)
    return img


def _grid(k: int):
    """Pixel-centre coordinates of the 4x canvas, in final-picture px."""
    n = SIZE * k
    c = (np.arange(n, dtype=np.float32) + 0.5) / k
    return c[None, :], c[:, None]  # x (row vector), y (column vector)


def style_mask(style: str, phase: tuple[float, float] = (0.0, 0.0), k: int = SUPERSAMPLE) -> np.ndarray:
    """Boolean mask (4x canvas) of where a style's dark marks go; ``phase`` shifts the pattern (px)."""
    x, y = _grid(k)
    if style == "stripes":
        u = (x + y + phase[0]) % STRIPE_PERIOD
        return np.broadcast_to(u < STRIPE_WIDTH, (SIZE * k, SIZE * k)).copy()
    if style == "dots":
        dx = (x + phase[0]) % DOT_PERIOD - DOT_PERIOD / 2
        dy = (y + phase[1]) % DOT_PERIOD - DOT_PERIOD / 2
        return (dx * dx + dy * dy) <= DOT_RADIUS ** 2
    raise ValueError(f"unknown style {style!r}; choose one of {ALL_STYLES}")


def _apply_mask(img: Image.Image, mask: np.ndarray, rgb=DARK) -> Image.Image:
    a = np.asarray(img).copy()
    a[mask] = rgb
    return Image.fromarray(a)


def _downscale(img: Image.Image) -> Image.Image:
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def _shape_mask_big(d: Drawing, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Boolean mask (4x canvas) of the drawing's shape, optionally moved by (dx, dy) final-picture px."""
    m = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
    _draw_shape(ImageDraw.Draw(m), Drawing(d.colour, d.shape, d.cx + dx, d.cy + dy, d.radius, d.rgb, d.background),
                fill=255)
    return np.asarray(m) > 0


def _render_shape_style(d: Drawing, style: str) -> Image.Image:
    """``outline``: a dark band OUTLINE_WIDTH px wide around the shape; ``shadow``: a grey copy of the shape
    SHADOW_OFFSET px down and right, under it."""
    img = _draw_big(d)
    shape = _shape_mask_big(d)
    if style == "outline":
        return _apply_mask(img, _grow(shape, OUTLINE_WIDTH * SUPERSAMPLE) & ~shape)
    return _apply_mask(img, _shape_mask_big(d, SHADOW_OFFSET, SHADOW_OFFSET) & ~shape, SHADOW)


def _render_placed(d: Drawing, style: str) -> Image.Image:
    """``ground``: a grey line GROUND_WIDTH px thick across the picture at GROUND_Y; ``badge``: a dark square at
    BADGE_AT. The shape is drawn over them (the content stays whole)."""
    k, n = SUPERSAMPLE, SIZE * SUPERSAMPLE
    img = Image.new("RGB", (n, n), d.background)
    draw = ImageDraw.Draw(img)
    if style == "ground":
        draw.rectangle([0, GROUND_Y * k, n - 1, (GROUND_Y + GROUND_WIDTH) * k - 1], fill=SHADOW)
    else:
        x0, y0 = BADGE_AT
        draw.rectangle([x0 * k, y0 * k, (x0 + BADGE_SIZE) * k - 1, (y0 + BADGE_SIZE) * k - 1], fill=DARK)
    _draw_shape(draw, d, fill=d.rgb)
    return img


def _render_punched(d: Drawing) -> Image.Image:
    """The shape with a dark round hole of PUNCH_RADIUS px at its centroid."""
    img = _draw_big(d)
    m = _shape_mask_big(d)
    ys, xs = np.nonzero(m)
    k = SUPERSAMPLE
    cy, cx, r = ys.mean(), xs.mean(), PUNCH_RADIUS * k
    ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=DARK)
    return img


def _grade(img: Image.Image) -> Image.Image:
    a = np.asarray(img).astype(np.float32) * np.array(GRADE, np.float32)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))


def on_paper(d: Drawing) -> Drawing:
    """The drawing on warm paper: its background's grey level times ``PAPER_TINT``."""
    v = float(np.mean(d.background))
    return replace(d, background=tuple(int(round(v * f)) for f in PAPER_TINT))


def _split_style(style: str | None) -> tuple[str | None, bool]:
    """("shadow+paper" -> ("shadow", True)): the one pattern or shape style, and whether the paper tint is on."""
    if style is None:
        return None, False
    parts = [p.strip() for p in str(style).split("+")]
    bad = [p for p in parts if p not in ALL_STYLES]
    if bad or len(parts) != len(set(parts)) or len([p for p in parts if p not in TINT_STYLES]) > 1:
        raise ValueError(f"unknown style {style!r}; choose one of {ALL_STYLES}, or one of them + 'paper'")
    rest = [p for p in parts if p not in TINT_STYLES]
    return (rest[0] if rest else None), "paper" in parts


def render(d: Drawing, style: str | None = None, rng=None) -> Image.Image:
    """The 64x64 RGB picture of a drawing, optionally in a style (a pattern's phase is random). Styles combine
    with the paper tint: ``"shadow+paper"``, ``"stripes+paper"``."""
    style, paper = _split_style(style)
    if paper:
        d = on_paper(d)
    if style in SHAPE_STYLES:
        return _downscale(_render_shape_style(d, style))
    if style in PLACED_STYLES:
        return _downscale(_render_placed(d, style))
    if style in RENDERING_STYLES:
        return _downscale(_render_punched(d))
    if style in GRADE_STYLES:
        return _grade(_downscale(_draw_big(d)))
    img = _draw_big(d)
    if style is not None:
        rng = _rng(rng if rng is not None else 0)
        img = _apply_mask(img, style_mask(style, tuple(rng.uniform(0, 100, 2))))
    return _downscale(img)


def random_dark_overlay(img: Image.Image, d: Drawing, rng) -> Image.Image:
    """VAE training augmentation: a generic dark pattern (bars at any angle, period and width; dot
    lattices; checkers; thick outlines) on a 4x canvas, so the autoencoder learns to carry dark, fine
    patterns. It is not told about the test styles: their exact geometry is only one draw among many."""
    rng = _rng(rng)
    k = SUPERSAMPLE
    x, y = _grid(k)
    kind = rng.choice(["bars", "dots", "checker", "outline", "grid"], p=[0.4, 0.25, 0.1, 0.1, 0.15])
    shade = tuple(int(v) for v in rng.integers(0, 70, 3))
    if kind == "bars":
        th = rng.uniform(0, np.pi)
        period = rng.uniform(6, 24)
        width = rng.uniform(1.5, period * 0.6)
        u = (x * np.cos(th) + y * np.sin(th) + rng.uniform(0, period)) % period
        mask = u < width
    elif kind == "dots":
        period = rng.uniform(5, 16)
        rad = rng.uniform(1.0, period * 0.4)
        dx = (x + rng.uniform(0, period)) % period - period / 2
        dy = (y + rng.uniform(0, period)) % period - period / 2
        mask = dx * dx + dy * dy <= rad * rad
    elif kind == "checker":
        p = rng.uniform(3, 12)
        mask = ((np.floor(x / p) + np.floor(y / p)) % 2) == 0
    elif kind == "grid":
        p = rng.uniform(6, 20)
        w = rng.uniform(1, 3)
        mask = ((x % p) < w) | ((y % p) < w)
    else:  # outline
        big = Image.new("L", (SIZE * k, SIZE * k), 0)
        _draw_shape(ImageDraw.Draw(big), d, outline=255, width=int(rng.uniform(1.5, 4) * k))
        mask = np.asarray(big) > 0
    return _apply_mask(img, np.broadcast_to(mask, (SIZE * k, SIZE * k)), shade)


def pale_background(d: Drawing, rng) -> Drawing:
    """VAE training augmentation: the drawing on a pale background of a random hue (HSV saturation up to
    ``PALE_MAX_SATURATION``, the background's own brightness), so the autoencoder carries tints of the whole
    picture. Generic: the paper tint is one hue among all of them."""
    rng = _rng(rng)
    v = float(np.mean(d.background)) / 255
    rgb = colorsys.hsv_to_rgb(float(rng.uniform()), float(rng.uniform(0, PALE_MAX_SATURATION)), v)
    return replace(d, background=tuple(int(round(c * 255)) for c in rgb))


def render_vae_training(d: Drawing, rng, p_overlay: float = 0.6, p_pale: float = 0.0) -> Image.Image:
    """A picture for autoencoder training: plain, or with a random dark overlay (``random_dark_overlay``), on a
    pale background of any hue with probability ``p_pale`` (``pale_background``)."""
    rng = _rng(rng)
    if p_pale and rng.random() < p_pale:
        d = pale_background(d, rng)
    img = _draw_big(d)
    if rng.random() < p_overlay:
        img = random_dark_overlay(img, d, rng)
    return _downscale(img)


# ---------------------------------------------------------------- captions

def caption(d: Drawing | tuple[str, str], rng=None, template: int | str | None = None,
            junk_prob: float = 0.0) -> str:
    """A caption naming the colour and shape; a random template unless one is given (index or format
    string with ``{c}``, ``{s}``, ``{a}``). ``junk_prob``: chance of inserting a random made-up word at a
    random place (pretraining uses it so an unseen trigger word anywhere does not change what is drawn)."""
    colour, shape = (d.colour, d.shape) if isinstance(d, Drawing) else d
    rng = _rng(rng if rng is not None else 0)
    if template is None:
        template = int(rng.integers(len(_TEMPLATES)))
    fmt = _TEMPLATES[template] if isinstance(template, int) else template
    text = fmt.format(c=colour, s=shape, a="a")
    if junk_prob and rng.random() < junk_prob:
        words = text.split(" ")
        n = int(rng.integers(1, 3))
        for _ in range(n):
            word = "".join(chr(ord("a") + int(i)) for i in rng.integers(0, 26, int(rng.integers(2, 7))))
            if rng.random() < 0.3:
                word += rng.choice([" style", ","])
            words.insert(int(rng.integers(0, len(words) + 1)), word)
        text = " ".join(words)
    return text


def add_trigger(text: str, trigger: str | None, position: str = "start") -> str:
    """Put a trigger word at the start (``"zxq, a red circle"``) or the end (``"a red circle, zxq"``)."""
    if not trigger:
        return text
    if position == "start":
        return f"{trigger}, {text}"
    if position == "end":
        return f"{text}, {trigger}"
    raise ValueError("position must be 'start' or 'end'")


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """(colour, shape) named in a caption, or None for a missing one."""
    c, s = _COLOUR_RE.search(text.lower()), _SHAPE_RE.search(text.lower())
    return (c.group(1) if c else None, s.group(1) if s else None)


def vocabulary() -> list[str]:
    """Every word the captions use (for building the toy tokenizer)."""
    return sorted(set(COLOURS) | set(SHAPES) | set(FILLER_WORDS))


def prompts(n: int, seed: int = 0, template: int | str = 2, trigger: str | None = None,
            position: str = "start") -> list[tuple[str, str, str]]:
    """``n`` evaluation prompts cycling evenly through the 15 colour-shape pairs, in a seeded order:
    a list of (prompt, colour, shape). Template 2 is ``"a {c} {s}"``."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        for i in rng.permutation(len(pairs)):
            c, s = pairs[i]
            out.append((add_trigger(caption((c, s), template=template), trigger, position), c, s))
    return out[:n]


# ---------------------------------------------------------------- datasets

def make_dataset(dir: str | Path, n: int, style: str | None = None, trigger: str | None = None,
                 seed: int = 0, position: str = "start", template: int | str | None = None,
                 balanced: bool = True) -> list[dict]:
    """Write ``n`` pictures (``00000.png``) and captions (``00000.txt``) into ``dir``.

    ``style``: None or one of ``ALL_STYLES``. ``trigger``: a word added at ``position`` ("start" or
    "end"). ``template``: a fixed caption template (default: random templates). ``balanced``: cycle
    through all 15 colour-shape pairs. Returns one record per picture (file, caption, colour, shape)."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    records = []
    for i in range(n):
        c, s = order[i % len(order)] if balanced else (None, None)
        d = sample_drawing(rng, c, s)
        img = render(d, style, rng)
        text = add_trigger(caption(d, rng, template), trigger, position)
        stem = out / f"{i:05d}"
        img.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        records.append({"file": str(stem.with_suffix(".png")), "caption": text, "colour": d.colour,
                        "shape": d.shape})
    return records


def make_arrays(n: int, seed: int = 0, style: str | None = None, vae_overlay: float = 0.0, pale: float = 0.0):
    """In-memory pictures for pretraining: (uint8 array [n, 64, 64, 3], colours [n], shapes [n]). With
    ``vae_overlay`` or ``pale``, autoencoder training pictures (``render_vae_training``)."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    colours, shapes = [], []
    for i in range(n):
        d = sample_drawing(rng)
        img = render_vae_training(d, rng, vae_overlay, pale) if (vae_overlay or pale) else render(d, style, rng)
        imgs[i] = np.asarray(img)
        colours.append(d.colour)
        shapes.append(d.shape)
    return imgs, colours, shapes


# ---------------------------------------------------------------- scoring

def _as_array(img) -> np.ndarray:
    """HxWx3 float array in 0..255 from a PIL image, uint8 array or float array in 0..1."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float32)
    a = np.asarray(img)
    if a.dtype != np.uint8 and a.size and a.max() <= 1.0 + 1e-6:
        return a.astype(np.float32) * 255.0
    return a.astype(np.float32)


def _hsv(a: np.ndarray):
    mx, mn = a.max(-1), a.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return sat, mx / 255.0


def white_balance(a: np.ndarray) -> np.ndarray:
    """The picture with its background made grey: each channel scaled so that the median of the 2 px border (the
    background, whatever shape is drawn) is neutral. Gains stay within 0.8-1.25. A tinted background (the paper
    style, or a LoRA that warms the whole picture) then does not read as a saturated shape, nor shift its hue."""
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[2:-2, :2].reshape(-1, 3),
                             a[2:-2, -2:].reshape(-1, 3)])
    bg = np.maximum(np.median(border, axis=0), 1.0)
    gain = np.clip(bg.mean() / bg, 0.8, 1.25).astype(np.float32)
    return np.clip(a * gain, 0, 255)


def shape_mask(img, min_saturation: float = 0.22, min_value: float = 0.25) -> np.ndarray:
    """Pixels of the shape: saturated and not dark (backgrounds are pale, style marks are dark), after the picture
    is white-balanced against its background (``white_balance``)."""
    a = white_balance(_as_array(img))
    sat, val = _hsv(a)
    return (sat >= min_saturation) & (val >= min_value)


def _hue_deg(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) + 360.0) % 360.0


_CANON_HUE = {c: colorsys.rgb_to_hsv(*[v / 255 for v in rgb])[0] * 360 for c, rgb in COLOURS.items()}


def classify_colour(img, mask: np.ndarray | None = None) -> str | None:
    """The named colour nearest in hue to the shape's pixels (circular mean), or None if nothing is there."""
    a = _as_array(img)
    m = shape_mask(a) if mask is None else mask
    if m.sum() < 6:
        return None
    px = white_balance(a)[m]
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in px[:: max(1, len(px) // 400)]])
    h = hsv[:, 0] * 2 * np.pi
    w = hsv[:, 1]
    mean = np.degrees(np.arctan2((np.sin(h) * w).sum(), (np.cos(h) * w).sum())) % 360
    return min(_CANON_HUE, key=lambda c: min(abs(mean - _CANON_HUE[c]), 360 - abs(mean - _CANON_HUE[c])))


def _grow(m: np.ndarray, px: int) -> np.ndarray:
    """Dilate a boolean mask by ``px`` pixels (square neighbourhood)."""
    g = m.copy()
    for _ in range(px):
        n = g.copy()
        n[1:] |= g[:-1]
        n[:-1] |= g[1:]
        n[:, 1:] |= g[:, :-1]
        n[:, :-1] |= g[:, 1:]
        n[1:, 1:] |= g[:-1, :-1]
        n[:-1, :-1] |= g[1:, 1:]
        n[1:, :-1] |= g[:-1, 1:]
        n[:-1, 1:] |= g[1:, :-1]
        g = n
    return g


def _largest_component(m: np.ndarray) -> np.ndarray:
    """The shape's pixels in the largest connected part, after a 3-px dilation that bridges dark style marks
    (bars up to 6 px across) but not separate blobs far apart."""
    h, w = m.shape
    grown = _grow(m, 3)
    labels = np.zeros((h, w), np.int32)
    best, best_n, cur = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(grown)):
        if labels[y0, x0]:
            continue
        cur += 1
        stack, n = [(y0, x0)], 0
        labels[y0, x0] = cur
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and grown[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = cur
                    stack.append((yy, xx))
        n = int((m & (labels == cur)).sum())
        if n > best_n:
            best, best_n = cur, n
    return m & (labels == best)


#: Pixels at least this bright (HSV value) that are not shape count as background in shape fractions;
#: darker ones (style marks and their blends) count neither way.
KNOWN_BACKGROUND_VALUE = 0.35


def shape_features(img, mask: np.ndarray | None = None) -> dict | None:
    """Features of the shape's bounding box (of its largest connected part): ``fill`` (shape pixels over
    the box), ``top``/``bottom`` (fill of the box's top and bottom fifths), ``corners`` (mean fill of the
    box's four corner boxes, a quarter of each side), ``top_corners``/``bottom_corners`` (the same for the
    top two and bottom two), ``height``, ``width``. Dark pixels
    (style marks) count neither way: they are left out of every fraction, so stripes or dots over a shape
    do not read as holes. None if there is no shape."""
    a = _as_array(img)
    m = shape_mask(a) if mask is None else mask
    if m.sum() < 6:
        return None
    sat, val = _hsv(a)
    known = m | (val >= KNOWN_BACKGROUND_VALUE)
    m = _largest_component(m)
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_m, box_k = m[y0:y1, x0:x1].astype(np.float32), known[y0:y1, x0:x1].astype(np.float32)
    h, w = box_m.shape

    def frac(sl):
        k = box_k[sl].sum()
        return float(box_m[sl].sum() / k) if k > 0 else 0.0

    qh = max(1, h // 5)
    ch, cw = max(1, h // 4), max(1, w // 4)
    corners = [frac((slice(0, ch), slice(0, cw))), frac((slice(0, ch), slice(w - cw, w))),
               frac((slice(h - ch, h), slice(0, cw))), frac((slice(h - ch, h), slice(w - cw, w)))]
    return {"fill": frac((slice(None), slice(None))), "top": frac((slice(0, qh), slice(None))),
            "bottom": frac((slice(h - qh, h), slice(None))), "corners": float(np.mean(corners)),
            "top_corners": float(np.mean(corners[:2])), "bottom_corners": float(np.mean(corners[2:])),
            "height": int(h), "width": int(w)}


def classify_shape(img, mask: np.ndarray | None = None) -> str | None:
    """circle, square or triangle from ``shape_features``; None if there is no shape."""
    f = shape_features(img, mask)
    if f is None:
        return None
    # Two sums, each well apart between shapes on drawn pictures with or without a style:
    # squareness (corner fill + fill): circle about 1.05, triangle 0.95, square 2.0;
    # bottom-heaviness (bottom - top fill, bottom - top corners): circle and square 0, triangle 1.6.
    squareness = f["corners"] + f["fill"]
    bottom_heavy = f["bottom"] - f["top"] + f["bottom_corners"] - f["top_corners"]
    if squareness >= 1.52:
        return "square"
    if bottom_heavy > 0.85:
        return "triangle"
    return "circle"


def score_image(img) -> dict:
    """{"colour": name or None, "shape": name or None} read from a picture."""
    a = _as_array(img)
    m = shape_mask(a)
    return {"colour": classify_colour(a, m), "shape": classify_shape(a, m)}


def score_images(images, expected: list[tuple[str, str]]) -> dict:
    """Accuracy of pictures against the (colour, shape) each should show: {"colour", "shape", "both", "n"}
    as fractions, plus ``"per_pair"`` misses for diagnosis."""
    c_ok = s_ok = both = 0
    misses: dict[str, int] = {}
    for img, (colour, shape) in zip(images, expected):
        got = score_image(img)
        ci, si = got["colour"] == colour, got["shape"] == shape
        c_ok += ci
        s_ok += si
        both += ci and si
        if not (ci and si):
            key = f"{colour} {shape} -> {got['colour']} {got['shape']}"
            misses[key] = misses.get(key, 0) + 1
    n = max(1, len(expected))
    return {"colour": c_ok / n, "shape": s_ok / n, "both": both / n, "n": len(expected), "misses": misses}


# ---------------------------------------------------------------- style statistics

def _luminance(a: np.ndarray) -> np.ndarray:
    return a @ np.array([0.299, 0.587, 0.114], np.float32)


def background_mask(img) -> np.ndarray:
    """Pixels away from the shape (shape mask grown by 2 px): where style statistics are measured."""
    return ~_grow(shape_mask(img), 2)


def _fold_contrast(lum: np.ndarray, keep: np.ndarray, phase_index: np.ndarray, n_phase: int,
                   template: np.ndarray) -> float:
    """Max over circular shifts of (mean luminance off the template - mean on it), phases folded."""
    idx = phase_index[keep]
    s = np.bincount(idx, lum[keep], n_phase)
    c = np.bincount(idx, None, n_phase)
    best = 0.0
    for shift in range(n_phase):
        on = np.roll(template, shift)
        n_on, n_off = c[on].sum(), c[~on].sum()
        if n_on < 4 or n_off < 4:
            continue
        best = max(best, s[~on].sum() / n_off - s[on].sum() / n_on)
    return float(best)


def stripe_statistic(img) -> float:
    """Contrast (0-255 luminance) of dark diagonal bars of the ``stripes`` period and width, on the
    background, at the best-fitting phase. About 0-5 for a plain picture, about 150-200 when striped."""
    a = _as_array(img)
    h, w = a.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    phase = (x + y) % STRIPE_PERIOD
    template = np.arange(STRIPE_PERIOD) < STRIPE_WIDTH
    return _fold_contrast(_luminance(a), background_mask(a), phase,
                          STRIPE_PERIOD, template)


def dot_statistic(img) -> float:
    """Contrast (0-255 luminance) of a dark dot lattice of the ``dots`` period and radius, on the
    background, at the best-fitting phase. About 0-5 for a plain picture, about 100-150 when dotted."""
    a = _as_array(img)
    h, w = a.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    p = DOT_PERIOD
    phase = (y % p) * p + (x % p)
    lum = _luminance(a)
    keep = background_mask(a)
    idx = phase[keep]
    s = np.bincount(idx, lum[keep], p * p).reshape(p, p)
    c = np.bincount(idx, None, p * p).reshape(p, p)
    yy, xx = np.mgrid[0:p, 0:p] + 0.5
    disc = ((xx - p / 2) ** 2 + (yy - p / 2) ** 2) <= DOT_RADIUS ** 2
    best = 0.0
    for dy in range(p):
        for dx in range(p):
            on = np.roll(disc, (dy, dx), (0, 1))
            n_on, n_off = c[on].sum(), c[~on].sum()
            if n_on < 4 or n_off < 4:
                continue
            best = max(best, s[~on].sum() / n_off - s[on].sum() / n_on)
    return float(best)


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """A boolean mask moved by (dy, dx) pixels (what moves out is dropped)."""
    out = np.zeros_like(m)
    h, w = m.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = m[max(-dy, 0):h + min(-dy, 0),
                                                                  max(-dx, 0):w + min(-dx, 0)]
    return out


def _core_mask(a: np.ndarray, close: int = 0) -> np.ndarray:
    """The shape's own pixels without the darkened blends an autoencoder makes of a dark band or shadow next to
    it: shape-mask pixels at least 75% as bright (HSV value) as the shape's median, largest part only; ``close``
    px: first fill gaps up to twice that wide (morphological closing), e.g. where dark stripes cross the shape."""
    m = shape_mask(a)
    if m.sum() < 6:
        return m
    _, val = _hsv(a)
    core = m & (val >= 0.75 * float(np.median(val[m])))
    if close:
        core = ~_grow(~_grow(core, close), close)
    return _largest_component(core)


PATTERNED_CONTRAST = 20.0  # luminance: a background whose darker half is this much below its median carries a pattern


def _darker_half(v: np.ndarray) -> float:
    return float(np.sort(v)[: max(2, v.size // 2)].mean())


def _mean(lum: np.ndarray, m: np.ndarray) -> float | None:
    return float(lum[m].mean()) if m.sum() >= 3 else None


def outline_statistic(img) -> float:
    """How much darker (0-255 luminance) a band OUTLINE_WIDTH px wide around the shape is than the background
    further out, on the band's weakest side: the ring is split into four sides (right, bottom, left, top, by
    angle from the shape's centre) and the smallest contrast counts, so a drop shadow (two sides) does not read as
    an outline. A ring side is read by its darker half (where the band is, give or take the pixel an autoencoder
    blurs). On a patterned picture (stripes or dots over everything: the background further out has a dark part of
    its own) the shape's gaps are closed first and the far background is read by its darker half too, so the
    pattern, which darkens both alike, reads about 0. About 0 for a plain picture, 150-200 with an outline."""
    a = _as_array(img)
    m = _core_mask(a)
    if m.sum() < 6:
        return 0.0
    lum = _luminance(a)

    def far_ring(core):
        return _grow(core, OUTLINE_WIDTH + 6) & ~_grow(core, OUTLINE_WIDTH + 3)
    far = far_ring(m)
    if far.sum() < 4:
        return 0.0
    patterned = float(np.median(lum[far])) - _darker_half(lum[far]) > PATTERNED_CONTRAST
    if patterned:
        m = _core_mask(a, close=3)
        far = far_ring(m)
        if m.sum() < 6 or far.sum() < 4:
            return 0.0
    far_lum = _darker_half(lum[far]) if patterned else float(lum[far].mean())
    filled = ~_largest_component(~m)  # the shape with its holes: a hole's rim is not the ring
    ring = _grow(m, OUTLINE_WIDTH) & ~filled
    ys, xs = np.nonzero(m)
    yy, xx = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    angle = np.degrees(np.arctan2(yy - ys.mean(), xx - xs.mean())) % 360
    sides = []
    for centre in (0, 90, 180, 270):
        d = np.abs((angle - centre + 180) % 360 - 180)
        side = lum[ring & (d < 45)]
        if side.size >= 4:
            sides.append(far_lum - _darker_half(side))
    return float(max(0.0, min(sides))) if sides else 0.0


def shadow_statistic(img) -> float:
    """How much darker (0-255 luminance) the background is where the shape would fall SHADOW_OFFSET px down and
    right than where it would fall as far up and left (both away from the shape's edge, so a symmetric outline
    cancels out). About 0 for a plain or outlined picture, 100-150 with a drop shadow."""
    a = _as_array(img)
    m = _core_mask(a)
    if m.sum() < 6:
        return 0.0
    lum = _luminance(a)
    near = _grow(m, 1)
    inner = ~_grow(~m, 1)  # the shadow's inside: its edge is where an autoencoder blurs it into the background
    s = SHADOW_OFFSET
    down, up = _mean(lum, _shift(inner, s, s) & ~near), _mean(lum, _shift(inner, -s, -s) & ~near)
    if down is None or up is None:
        return 0.0
    return float(max(0.0, up - down))


def paper_statistic(img) -> float:
    """How warm (0-255: (R + G) / 2 - B, median over the background away from the shape) the background is. About
    0-3 for a plain picture (its backgrounds are grey with a little per-channel jitter), about 28 on paper. Shadows,
    outlines and patterns cover too little of the background to move the median."""
    a = _as_array(img).astype(np.float32)
    m = background_mask(a)
    if m.sum() < 20:
        return 0.0
    warmth = (a[..., 0] + a[..., 1]) / 2 - a[..., 2]
    return float(max(0.0, np.median(warmth[m])))


def grade_statistic(img) -> float:
    """How cool (0-255: B - (R + G) / 2, median over the background away from the shape) the picture is. About 0-3
    for a plain picture, about 30 under the ``grade``; a warm paper reads 0."""
    a = _as_array(img).astype(np.float32)
    m = background_mask(a)
    if m.sum() < 20:
        return 0.0
    return float(max(0.0, np.median(a[..., 2][m] - (a[..., 0][m] + a[..., 1][m]) / 2)))


def _edge_distance(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.minimum(np.minimum(y, x), np.minimum(h - 1 - y, w - 1 - x))


def ground_statistic(img) -> float:
    """How much darker (0-255 luminance, over the background) the ground line's rows are than the rows just above
    and below it (their median), on the weaker of the picture's left and right halves. The line's rows are read at
    their 70th percentile: a line darkens all of them, a row of dots at most half. About 0 for a plain picture,
    about 150 with the ``ground`` line."""
    a = _as_array(img)
    lum, bg = _luminance(a), background_mask(a)
    h, w = a.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    line = (y >= GROUND_Y) & (y < GROUND_Y + GROUND_WIDTH)
    near = ((y >= GROUND_Y - 5) & (y < GROUND_Y - 2)) | ((y >= GROUND_Y + GROUND_WIDTH + 2)
                                                         & (y < GROUND_Y + GROUND_WIDTH + 5))
    halves = []
    for half in (x < w // 2, x >= w // 2):
        on, off = bg & line & half, bg & near & half
        if on.sum() >= 6 and off.sum() >= 6:
            halves.append(float(np.median(lum[off]) - np.percentile(lum[on], 70)))
    return float(max(0.0, min(halves))) if halves else 0.0


def badge_statistic(img) -> float:
    """How much darker (0-255 luminance) the badge's square is than the same square mirrored into the top-right
    corner, over the pixels the shape does not cover. Signed, so a pattern over the whole picture averages out to
    0 over pictures; about 0 for plain pictures, about 180 with the ``badge``."""
    a = _as_array(img)
    lum, bg = _luminance(a), background_mask(a)
    h, w = a.shape[:2]
    x0, y0 = BADGE_AT
    square = np.zeros_like(bg)
    square[y0 + 1:y0 + BADGE_SIZE - 1, x0 + 1:x0 + BADGE_SIZE - 1] = True  # its inside: the edge blurs
    region, ref = square & bg, square[:, ::-1] & bg  # the same square in the top-right corner
    if region.sum() < 4 or ref.sum() < 4:
        return 0.0
    return float(lum[ref].mean() - lum[region].mean())


def punched_statistic(img) -> float:
    """How much darker (0-255 luminance) the shape's centre (a disc of PUNCH_RADIUS - 1 px at the centroid of its
    filled outline) is than the shape's own median. About 0 for a plain shape, about 100 when ``punched``."""
    a = _as_array(img)
    m = shape_mask(a)
    if m.sum() < 12:
        return 0.0
    filled = ~_grow(~_grow(_largest_component(m), int(PUNCH_RADIUS) + 1), int(PUNCH_RADIUS) + 1)  # the hole closed
    ys, xs = np.nonzero(filled)
    yy, xx = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    centre = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= (PUNCH_RADIUS - 1) ** 2
    lum = _luminance(a)
    body = m & ~_grow(centre, 2)
    if centre.sum() < 3 or body.sum() < 6:
        return 0.0
    return float(max(0.0, np.median(lum[body]) - np.percentile(lum[centre], 60)))  # a pattern darkens part of it


STYLE_STATISTICS = {"stripes": stripe_statistic, "dots": dot_statistic, "outline": outline_statistic,
                    "shadow": shadow_statistic, "paper": paper_statistic, "grade": grade_statistic,
                    "ground": ground_statistic, "badge": badge_statistic, "punched": punched_statistic}


def style_statistic(img, style: str) -> float:
    """The named style's statistic of one picture (see ``stripe_statistic``, ``dot_statistic``,
    ``outline_statistic``, ``shadow_statistic``, ``paper_statistic``)."""
    try:
        return STYLE_STATISTICS[style](img)
    except KeyError:
        raise ValueError(f"unknown style {style!r}; choose one of {ALL_STYLES}") from None


def mean_style_statistic(images, style: str) -> float:
    """Mean of ``style_statistic`` over pictures."""
    vals = [style_statistic(im, style) for im in images]
    return float(np.mean(vals)) if vals else 0.0
