"""The first-run demo: a small model and a folder of drawn pictures, so scan, caption, train and generate run on a CPU.

``create_demo(root, style=...)`` writes ``<root>/demo/``:

* ``<style>/images/``: 30 drawn pictures of coloured shapes in one of the toy world's styles (``DEMO_STYLES``, the
  user picks one; ``shadow``, a drop shadow, by default), named ``red_circle_00.png`` and so on, without captions
  (the template captioner turns the names into "zxq style, red circle"). Each style has its own folder, so
  switching style keeps the captions written for another one; a folder is drawn under a temporary name and
  renamed when complete. Two pictures are wider and one taller than square, so the bucket preview has crops to
  show. ``demo.json`` records the style picked last.
* the base model: the toy-world model pretrained on drawn shapes (``trainer/assets/toyworld``), shipped with the
  package. ``DemoInfo.label`` says what it is, and the web app shows it.
* ``regularisation/``: as many plain toy-world pictures with ordinary captions ("a red circle"), mixed into every batch
  (prior preservation). The toy-world measurements (docs/toyworld.md, phase 2) show that without them the style
  leaks into prompts without the trigger word.
* a user preset ``demo``: the shipped ``toyworld-style`` preset (64 px, rank 8, caption dropout, regularisation)
  pointed at the picked style's folder, with samples along the way: a few minutes on a CPU.

Everything is drawn with Pillow/numpy; no download.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

TOYWORLD_MODEL = Path(__file__).resolve().parent.parent / "trainer" / "assets" / "toyworld"
TRIGGER = "zxq style"
#: The form of the captions the template captioner makes from the demo's file names (red_circle_00.png -> "red
#: circle", after the trigger): the demo's sample prompts and its measurement (benchmarks/toyworld/demo.py) use it,
#: since a LoRA trained on one caption form answers that form (docs/gui.md).
CAPTION_FORM = "{c} {s}"
PRESET_NAME = "demo"
TOYWORLD_PRESET = "toyworld-style"
DEMO_STEPS = 600
#: The styles the demo offers (the GUI's "Demo style" picker, `lorastudio ui --demo-style`, the docs); the first is
#: the default. Each is a toy-world style (datasets_tools.toyworld.STYLE_KINDS) measured to learn in DEMO_STEPS.
DEMO_STYLES: tuple[str, ...] = ("shadow", "outline", "paper")  # the ones the shipped recipe learns (docs/gui.md)
#: One line per toy-world style, what the user will see in the pictures (any style DEMO_STYLES may name).
DEMO_STYLE_HELP = {
    "shadow": "a grey drop shadow under each shape",
    "outline": "a dark ink outline around each shape",
    "ground": "a grey ground line across the foot of every picture",
    "paper": "a warm paper tint behind each shape",
    "stripes": "dark diagonal stripes over the whole picture",
    "dots": "a lattice of dark dots over the whole picture",
    "grade": "a cool colour grade of the whole picture",
    "badge": "a dark square badge in a corner",
    "punched": "a dark hole punched through each shape",
}


def style_help(style: str) -> str:
    """'shadow: a grey drop shadow under each shape'."""
    return f"{style}: {DEMO_STYLE_HELP.get(style, style)}"


@dataclass
class DemoInfo:
    root: str
    model: str
    images: str
    preset: str
    pretrained: bool
    label: str
    style: str = DEMO_STYLES[0]  # a demo.json written before the style picker is the drop-shadow demo


def toyworld_available() -> bool:
    return (TOYWORLD_MODEL / "model_index.json").is_file()


def demo_dir(root: str | Path) -> Path:
    return Path(root) / "demo"


def load_demo_info(root: str | Path) -> DemoInfo | None:
    """The demo made earlier in this root, if any (and still complete)."""
    p = demo_dir(root) / "demo.json"
    try:
        info = DemoInfo(**json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if not (Path(info.model) / "model_index.json").is_file() or not Path(info.images).is_dir():
        return None
    return info


def style_images_dir(root: str | Path, style: str) -> Path:
    """Where the demo's pictures in one style live: <root>/demo/<style>/images."""
    return demo_dir(root) / style / "images"


def check_style(style: str) -> str:
    if style not in DEMO_STYLES:
        from trainer.errors import UserError
        raise UserError(f"demo style {style!r}: choose one of {', '.join(DEMO_STYLES)}")
    return style


def create_demo(root: str | Path, *, style: str = DEMO_STYLES[0], n_images: int = 30, progress=None) -> DemoInfo:
    """Make (or reuse) the demo model, pictures in ``style`` and preset under <root>/demo; returns what was made.
    Pictures already drawn in that style (and their captions) are kept; the preset points at that style's folder."""
    say = progress or (lambda text: None)
    check_style(style)
    d = demo_dir(root).resolve()
    d.mkdir(parents=True, exist_ok=True)
    images = style_images_dir(d.parent, style)
    if not any(images.glob("*.png")):
        say(f"drawing the demo pictures ({style_help(style)}) ...")
        _draw_whole(images, lambda folder: draw_pictures(folder, n_images, style))
    reg = d / "regularisation"
    if not any(reg.glob("*.png")):
        say("drawing the regularisation pictures ...")
        _draw_whole(reg, lambda folder: draw_regularisation(folder, n_images))
    if not toyworld_available():
        from trainer.errors import UserError
        raise UserError(f"the toy-world model is missing from {TOYWORLD_MODEL} (it ships with LoRA Studio): "
                        "reinstall the package")
    model = TOYWORLD_MODEL
    label = (f"DEMO: the toy-world model, pretrained here on drawn coloured shapes (64 px); the demo pictures add "
             f"a style it never saw, '{style}' ({DEMO_STYLE_HELP.get(style, style)}). Training takes about 5 minutes "
             f"on a 2-core CPU; caption the pictures with the trigger '{TRIGGER}' first. Samples with the trigger "
             f"take on the style, the one without it stays plain (measured in docs/gui.md).")
    say("writing the demo preset ...")
    write_demo_preset(model, images, Path(root).resolve() / "outputs", reg, style)
    info = DemoInfo(str(d), str(model), str(images), PRESET_NAME, True, label, style)
    tmp = d / "demo.json.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=1), encoding="utf-8")
    os.replace(tmp, d / "demo.json")
    return info


def _draw_whole(folder: Path, draw) -> None:
    """Draw a picture folder under a temporary name and rename it when complete: an interrupted drawing leaves
    no half-filled folder that a later run would take as done."""
    tmp = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        draw(tmp)
        if folder.exists():  # an empty folder (no pictures): nothing of the user's to keep
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_demo_preset(model: Path, images: Path, outputs: Path, reg: Path, style: str = DEMO_STYLES[0]) -> Path:
    """The shipped toy-world preset pointed at the demo folders."""
    from trainer.config import apply_dict, load_config
    from trainer.config.presets import resolve_preset, save_user_preset
    cfg = load_config(resolve_preset(TOYWORLD_PRESET))
    # the demo stops at DEMO_STEPS (3-5 minutes on 2 cores): each offered style shows, shadow and outline at about two
    # thirds of the VAE ceiling against the full preset's 83-84% (measured per style: docs/gui.md)
    steps = min(cfg.train.max_steps, DEMO_STEPS)
    cfg = apply_dict(cfg, {
        "model": {"base": str(model)},
        "data": {"dir": str(images), "reg_dir": str(reg), "resolution": 64, "min_bucket_px": 64,
                 "max_bucket_px": 128, "bucket_step_px": 64, "default_caption": TRIGGER},
        "train": {"max_steps": steps, "save_every_steps": steps // 2},
        "sample": {"every_steps": steps // 4,
                   # the captions the walk-through makes ("{trigger}, red circle"): a LoRA trained on one caption form
                   # answers that form, not "a red circle" (measured: docs/gui.md)
                   "prompts": [f"{TRIGGER}, {CAPTION_FORM.format(c='red', s='circle')}",
                               f"{TRIGGER}, {CAPTION_FORM.format(c='blue', s='square')}",
                               CAPTION_FORM.format(c="yellow", s="triangle")],
                   "steps": 20, "guidance_scale": 5.0, "sampler": "ddim", "width": 64, "height": 64},
        "output": {"dir": str(outputs), "name": "demo-lora", "trigger_phrase": TRIGGER},
    }, "demo preset")
    return save_user_preset(PRESET_NAME, cfg, f"Demo: train on the drawn pictures in the '{style}' style "
                                              f"({DEMO_STYLE_HELP.get(style, style)}) with the toy-world model "
                                              f"({steps} steps at 64 px; the last sample prompt has no trigger "
                                              f"word and should stay plain).")


def draw_regularisation(folder: Path, n: int) -> None:
    """Plain toy-world pictures with ordinary captions (prior preservation for the demo run)."""
    from datasets_tools import toyworld as tw
    tw.make_dataset(folder, n, style=None, trigger=None, seed=2)


def draw_pictures(folder: Path, n: int, style: str = DEMO_STYLES[0]) -> list[Path]:
    """n pictures named <colour>_<shape>_<i>.png; toy-world drawings in ``style`` when available."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from datasets_tools import toyworld as tw
    except ImportError:
        tw = None
    out = []
    pairs = [(c, s) for c in ("red", "yellow", "green", "blue", "purple") for s in ("circle", "square", "triangle")]
    rnd = random.Random(0)
    rnd.shuffle(pairs)
    for i in range(n):
        colour, shape = pairs[i % len(pairs)]
        img = _toyworld_picture(tw, colour, shape, i, style) if tw is not None else _pillow_picture(colour, shape, rnd)
        if i in (1, 6):  # wider than square: the bucket preview shows the crop
            img = _pad(img, (img.width * 3 // 2, img.height))
        elif i == 4:
            img = _pad(img, (img.width, img.height * 3 // 2))
        p = folder / f"{colour}_{shape}_{i:02d}.png"
        img.save(p)
        out.append(p)
    return out


def _toyworld_picture(tw, colour: str, shape: str, i: int, style: str):
    import numpy as np
    rng = np.random.default_rng(1000 + i)
    return tw.render(tw.sample_drawing(rng, colour, shape), style, rng)


def _pillow_picture(colour: str, shape: str, rnd: random.Random):
    from PIL import Image, ImageDraw
    rgb = {"red": (215, 40, 40), "yellow": (235, 200, 30), "green": (40, 165, 60), "blue": (40, 80, 220),
           "purple": (150, 50, 200)}[colour]
    img = Image.new("RGB", (256, 256), tuple(rnd.randint(215, 245) for _ in range(3)))
    d = ImageDraw.Draw(img)
    r = rnd.randint(40, 80)
    cx, cy = rnd.randint(r, 256 - r), rnd.randint(r, 256 - r)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    for k in range(-256, 256, 64):  # the "stripes" style
        d.polygon([(k, 0), (k + 24, 0), (k + 24 + 256, 256), (k + 256, 256)], fill=(28, 26, 32))
    return img.resize((64, 64), Image.Resampling.BOX)


def _pad(img, size):
    from PIL import Image
    bg = max(img.getcolors(img.width * img.height))[1]  # the most frequent colour: the background
    canvas = Image.new("RGB", size, bg)
    canvas.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return canvas
