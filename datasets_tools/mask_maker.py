"""Make training masks: drawn by a text prompt (CLIPSeg) or taken from the pictures' own alpha channel.

The masks are what ``datasets_tools.masks`` reads for ``data.mask_dir``: one 8-bit greyscale PNG per picture,
named after the picture's file stem (``cat.jpg`` -> ``masks/cat.png``), the size of the upright picture, white =
train, black = ignore. A mask is made in this order: the probability map (CLIPSeg's sigmoid, resized to the
picture; or alpha / 255), the threshold (at or above it white, below it black), grow (a disc dilation, negative =
erosion), blur (Gaussian, soft edges), and last invert (255 minus the mask). Each file is written under a
temporary name and renamed, so a stopped run leaves whole masks only, and a new run keeps them.

``MASK_OPTIONS`` is the one description of the options (name, type, default, range, help): the ``lorastudio
masks`` flags and the Dataset tab's sliders are both made from it.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError, first_line
from .captioners import DEVICE_CHOICES, _auto_dtype, _looks_like_path, _pick_device, quiet_transformers
from .folder import Problem, check_folder, collect_images, is_image_file

#: The folder the masks go to, inside the dataset folder (``lorastudio masks DIR`` -> ``DIR/masks``).
MASK_DIR_NAME = "masks"
#: A hidden file in every mask folder this module writes: it says "these are masks, not pictures" to a folder
#: walker (the mask tool itself never makes masks of the files of a folder holding it).
from .folder import MASK_MARKER  # noqa: E402  (one source)
MAX_GROW_PX = 128
MAX_BLUR_PX = 64
MAX_BATCH = 64
#: Where a segmentation model runs (the captioners' choices).
DEVICES = DEVICE_CHOICES
#: collect_images problems that mean "this file is no usable picture" (a missing caption is no reason here).
_UNUSABLE = {"truncated", "empty", "not_an_image", "unreadable"}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MaskOption:
    """One option of mask making, described once for the CLI flag and the GUI slider."""
    name: str
    type: type
    default: float | int | bool
    min: float | None
    max: float | None
    step: float | None
    label: str
    help: str


MASK_OPTIONS: tuple[MaskOption, ...] = (
    MaskOption("threshold", float, 0.4, 0.0, 1.0, 0.01, "Threshold",
               "probability at or above which a pixel is trained (white); below it is black. 0 trains everywhere"),
    MaskOption("grow", int, 0, -MAX_GROW_PX, MAX_GROW_PX, 1, "Grow (px)",
               "pixels to grow the white area by after the threshold (a round brush); negative shrinks it"),
    MaskOption("blur", float, 0.0, 0.0, MAX_BLUR_PX, 0.5, "Blur (px)",
               "Gaussian blur radius in pixels, applied after grow: soft edges (grey = a weight in between)"),
    MaskOption("batch_size", int, 8, 1, MAX_BATCH, 1, "Batch size", "pictures per CLIPSeg batch"),
    MaskOption("invert", bool, False, None, None, None, "Invert",
               "invert the finished mask (255 minus it): train everything except what the prompt finds"),
)
OPTIONS: dict[str, MaskOption] = {o.name: o for o in MASK_OPTIONS}


def check_option(name: str, value):
    """A value of one option, type- and range-checked; a one-line DatasetError naming the option."""
    o = OPTIONS[name]
    if o.type is bool:
        return bool(value)
    try:
        v = o.type(value)
        if o.type is int and float(value) != v:
            raise ValueError
    except (TypeError, ValueError):
        raise DatasetError(f"{name}: expected {o.type.__name__}, got {value!r}", field=name) from None
    if (o.min is not None and v < o.min) or (o.max is not None and v > o.max):
        raise DatasetError(f"{name}: {value} is outside {o.min:g}..{o.max:g}", field=name)
    return v


# ------------------------------------------------------------------------------------------------ shaping


def _hmax(a, w: int):
    """Row-wise maximum over the window [x-w, x+w] (edges padded), by a doubling sparse table."""
    import numpy as np
    if w <= 0:
        return a
    n = a.shape[1]
    pad = np.pad(a, ((0, 0), (w, w)), mode="edge")
    length = 2 * w + 1
    k = length.bit_length() - 1
    table = pad
    span = 1
    for _ in range(k):
        table = np.maximum(table[:, :-span], table[:, span:])
        span *= 2
    # table[:, i] = max(pad[:, i : i + 2**k]); the window of x is [x, x + length) in pad
    return np.maximum(table[:, :n], table[:, length - span:length - span + n])


def dilate(a, r: int):
    """Grey dilation of a uint8 array by a disc of radius r (exact, any r)."""
    import numpy as np
    if r <= 0:
        return a
    h = a.shape[0]
    out = a.copy()
    rows: dict[int, object] = {}
    for dy in range(-r, r + 1):
        w = int((r * r - dy * dy) ** 0.5)
        if w not in rows:
            rows[w] = _hmax(a, w)
        src = rows[w]
        if abs(dy) >= h:
            continue
        if dy >= 0:  # out[y] takes src[y + dy]
            np.maximum(out[:h - dy], src[dy:], out=out[:h - dy])
        else:
            np.maximum(out[-dy:], src[:h + dy], out=out[-dy:])
    return out


def shape_mask(prob, *, threshold: float | None, grow: int = 0, blur: float = 0.0, invert: bool = False):
    """The finished mask ('L' image) of a probability map (H x W floats in 0..1): threshold (None keeps the
    probabilities as grey weights), grow, blur, invert."""
    import numpy as np
    from PIL import Image, ImageFilter

    p = np.asarray(prob, dtype=np.float32)
    if threshold is None:
        a = np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8)
    else:
        a = np.where(p >= threshold, 255, 0).astype(np.uint8)
    if grow > 0:
        a = dilate(a, grow)
    elif grow < 0:
        a = 255 - dilate(255 - a, -grow)
    img = Image.fromarray(a, "L")
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if invert:
        img = Image.fromarray(255 - np.asarray(img), "L")
    return img


# ------------------------------------------------------------------------------------------------ CLIPSeg


class ClipSegMasker:
    """transformers' CLIPSegForImageSegmentation + CLIPSegProcessor from a local folder or a hub id."""

    def __init__(self, model: str | os.PathLike, *, device: str = "auto"):
        if not model or not str(model).strip():
            raise DatasetError("masks from a prompt need --model (a CLIPSeg folder or hub id, e.g. "
                               "CIDAS/clipseg-rd64-refined)", field="--model")
        model = str(model).strip()
        if _looks_like_path(model):
            model = os.path.expanduser(model)
            if not os.path.exists(model):
                raise DatasetError(f"CLIPSeg model not found: {model}", path=model, field="--model")
        if device not in DEVICES:
            raise DatasetError(f"device: '{device}' is not one of {', '.join(DEVICES)}", field="--device")
        import transformers
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        with quiet_transformers():  # the weight-loading bar would bury our own progress bar
            try:
                config = transformers.AutoConfig.from_pretrained(model)
            except Exception as e:  # noqa: BLE001 - any failure here means "not a model folder / id"
                if os.path.exists(model):
                    raise DatasetError(f"{model} is not a CLIPSeg model folder or hub id (no readable transformers "
                                       f"config: {first_line(e)})", path=model, field="--model") from None
                raise DatasetError(f"cannot fetch the CLIPSeg model {model} from the hub (offline, or no such "
                                   f"id; a local folder works offline): {first_line(e)}", path=model,
                                   field="--model") from None
            kind = getattr(config, "model_type", "")
            if kind != "clipseg":
                raise DatasetError(f"{model} is a '{kind}' model, not CLIPSeg (e.g. CIDAS/clipseg-rd64-refined)",
                                   path=model, field="--model")
            self.device = _pick_device(device)
            self.dtype = _auto_dtype(self.device)
            try:
                self.processor = CLIPSegProcessor.from_pretrained(model)
                self.model = CLIPSegForImageSegmentation.from_pretrained(model, dtype=self.dtype)
            except Exception as e:  # noqa: BLE001
                raise DatasetError(f"cannot load CLIPSeg model {model}: {first_line(e)}", path=model,
                                   field="--model") from None
        try:
            self.model.to(self.device).eval()
        except (RuntimeError, AssertionError) as e:  # torch built without that device, or none present
            raise DatasetError(f"--device {self.device}: cannot run CLIPSeg there ({first_line(e)})",
                               field="--device") from None
        self.model_id = model

    def describe(self) -> str:
        return f"{type(self.model).__name__} ({self.model_id}) on {self.device}"

    def probabilities(self, images: Sequence, prompts: Sequence[str], sizes: Sequence[tuple[int, int]]) -> list:
        """Per image, the probability (0..1, float32 H x W at ``sizes[i]`` = (W, H)) that a pixel shows any of
        the prompts (the largest over the prompts)."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        best = [None] * len(images)
        for prompt in prompts:
            inputs = self.processor(text=[prompt] * len(images), images=list(images), padding=True,
                                    truncation=True, return_tensors="pt")
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items() if hasattr(v, "to")}
            with torch.inference_mode():
                logits = self.model(**inputs).logits
            if logits.ndim == 2:  # one image: some versions squeeze the batch away
                logits = logits[None]
            probs = torch.sigmoid(logits.float())
            for i, (w, h) in enumerate(sizes):
                up = F.interpolate(probs[i][None, None], size=(h, w), mode="bilinear", align_corners=False)
                p = up[0, 0].cpu().numpy().astype(np.float32)
                best[i] = p if best[i] is None else np.maximum(best[i], p)
        return best


# ------------------------------------------------------------------------------------------------ folder


@dataclass
class MaskRun:
    mask_dir: str
    written: list[str] = field(default_factory=list)  # mask files written (names in mask_dir)
    kept: list[str] = field(default_factory=list)  # pictures whose existing mask was kept (relative to root)
    skipped: list[Problem] = field(default_factory=list)  # pictures that got no mask, each with its reason
    source: str = ""  # what drew the masks (the model, or 'alpha channel')

    def summary(self) -> str:
        text = f"wrote {len(self.written)} mask(s) in {self.mask_dir}, kept {len(self.kept)} existing"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} picture(s)"
        return text


def _save_png(img, path: Path) -> None:
    from .captions import atomic_write_bytes
    buf = io.BytesIO()
    img.save(buf, "PNG")
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise DatasetError(f"cannot write mask {path}: {e.strerror or e}", path=str(path)) from None


def mask_plan(root: Path, mask_dir: Path, *, overwrite: bool) -> tuple[list, MaskRun]:
    """The pictures a run would make masks for (ImageItem list) and a MaskRun with what it keeps and skips."""
    from .masks import mask_index

    run = MaskRun(str(mask_dir))
    items, problems = collect_images(root)
    mdir = mask_dir.resolve()
    for p in problems:
        if p.kind in _UNUSABLE and not is_mask_file(Path(p.path), mdir):
            rel = _rel(Path(p.path), root)
            run.skipped.append(Problem(rel, p.kind, f"{rel}: {p.message.split(': ', 1)[-1]}"))
    existing = mask_index(mask_dir) if mask_dir.is_dir() else {}
    seen: dict[str, str] = {}
    todo = []
    for it in items:
        if is_mask_file(Path(it.path), mdir):
            continue  # the masks themselves
        rel = _rel(Path(it.path), root)
        stem = Path(it.path).stem
        if stem in seen:
            run.skipped.append(Problem(rel, "same_stem", f"{rel}: its mask would be {stem}.png, already the mask "
                                       f"of {seen[stem]} (masks are named by file stem; rename one)"))
            continue
        seen[stem] = rel
        if stem in existing and not overwrite:
            run.kept.append(rel)
        else:
            todo.append(it)
    return todo, run


def is_mask_file(path: Path, mask_dir: Path) -> bool:
    """A file of this run's mask folder, or of any folder this module has written masks to."""
    path = path.resolve()
    return path.is_relative_to(mask_dir) or (path.parent / MASK_MARKER).exists()


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def make_masks(root: str | os.PathLike, *, prompts: Sequence[str] = (), model: str | None = None,
               from_alpha: bool = False, mask_dir: str | os.PathLike | None = None, threshold: float | None = None,
               grow: int = 0, blur: float = 0.0, invert: bool = False, overwrite: bool = False,
               batch_size: int = 8, device: str = "auto", masker: ClipSegMasker | None = None,
               progress: Progress | None = None) -> MaskRun:
    """Write a mask for every picture under root into mask_dir (default root/masks).

    Prompt mode (``prompts`` + ``model`` or a loaded ``masker``): CLIPSeg's probability of any prompt, threshold
    default 0.4. Alpha mode (``from_alpha``): the picture's alpha channel, kept as it is unless a threshold is
    given; a picture without transparency is skipped. Existing masks (any image file with the picture's stem) are
    kept unless ``overwrite``; an overwritten mask replaces same-stem files of other types so the trainer reads
    the new one. A picture that cannot be read is skipped with one line, the rest go on.
    ``progress(done, total)`` replaces the terminal progress bar (the GUI passes one).
    """
    from .images import ImageError, load_rgb
    from .masks import load_alpha

    root = check_folder(root).resolve()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if from_alpha and prompts:
        raise DatasetError("choose one: --prompt (CLIPSeg) or --from-alpha (the alpha channel)", field="--prompt")
    if not from_alpha and not prompts:
        raise DatasetError("say what to mask with --prompt (e.g. --prompt 'the character'), or use --from-alpha",
                           field="--prompt")
    if threshold is None and not from_alpha:
        threshold = OPTIONS["threshold"].default
    if threshold is not None:
        threshold = check_option("threshold", threshold)
    grow, blur = check_option("grow", grow), check_option("blur", blur)
    batch_size = check_option("batch_size", batch_size)
    out = Path(mask_dir).expanduser() if mask_dir else root / MASK_DIR_NAME
    if out.exists() and not out.is_dir():
        raise DatasetError(f"mask folder {out} is a file, not a folder", path=str(out), field="--out")
    todo, run = mask_plan(root, out, overwrite=overwrite)
    if not todo:
        return run
    if not from_alpha and masker is None:
        masker = ClipSegMasker(model, device=device)
    run.source = "alpha channel" if from_alpha else masker.describe()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create mask folder {out}: {e.strerror or e}", path=str(out)) from None
    if not os.access(out, os.W_OK):
        raise DatasetError(f"mask folder {out} is not writable", path=str(out), field="--out")
    marker = out / MASK_MARKER
    if not marker.exists():
        from .captions import atomic_write_bytes
        atomic_write_bytes(marker, b"Training masks made by lorastudio masks (white = train, black = ignore).\n")

    def skip(it, kind: str, why: str) -> None:
        rel = _rel(Path(it.path), root)
        run.skipped.append(Problem(rel, kind, f"{rel}: {why}"))

    def save(it, mask) -> None:
        stem = Path(it.path).stem
        target = out / f"{stem}.png"
        _save_png(mask, target)
        run.written.append(target.name)
        if overwrite:  # a same-stem mask of another type would be read instead of the new one: it goes
            for other in out.iterdir():
                if other.stem == stem and other != target and other.is_file() and is_image_file(other):
                    other.unlink(missing_ok=True)

    bar = None
    if progress is None:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="masks (" + ("alpha" if from_alpha else "clipseg") + ")", unit="img",
                   file=sys.stderr, disable=None)  # disable=None: no bar when stderr is not a terminal
    done = 0
    step = 1 if from_alpha else batch_size
    try:
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            if from_alpha:
                for it in chunk:
                    try:
                        alpha = load_alpha(it.path)
                    except ImageError as e:
                        skip(it, e.reason.replace(" ", "_"), f"cannot be read ({e.reason})")
                        continue
                    if alpha is None:
                        skip(it, "no_alpha", "has no alpha channel (no mask written; it trains everywhere)")
                        continue
                    import numpy as np
                    prob = np.asarray(alpha, dtype=np.float32) / 255.0
                    save(it, shape_mask(prob, threshold=threshold, grow=grow, blur=blur, invert=invert))
            else:
                images, ok = [], []
                for it in chunk:
                    try:
                        images.append(load_rgb(it.path, draft_px=704))
                        ok.append(it)
                    except ImageError as e:
                        skip(it, e.reason.replace(" ", "_"), f"cannot be read ({e.reason})")
                if ok:
                    probs = masker.probabilities(images, prompts, [(it.width, it.height) for it in ok])
                    for it, prob in zip(ok, probs):
                        save(it, shape_mask(prob, threshold=threshold, grow=grow, blur=blur, invert=invert))
            done += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
            if progress is not None:
                progress(done, len(todo))
    finally:
        if bar is not None:
            bar.close()
    return run


# ------------------------------------------------------------------------------------------------ previews


def mask_contact_sheet(root: str | os.PathLike, out_png: str | os.PathLike, *, mask_dir: str | os.PathLike | None
                       = None, thumb_px: int = 160, max_images: int = 400) -> Path:
    """The bucket preview's contact sheet of root's pictures with their masks drawn over them (what a mask
    leaves out tinted blue; the trainer's crop box in yellow)."""
    from .preview import contact_sheet

    root = check_folder(root).resolve()
    mdir = Path(mask_dir).expanduser() if mask_dir else root / MASK_DIR_NAME
    if not mdir.is_dir():
        raise DatasetError(f"no mask folder {mdir}: make the masks first", path=str(mdir))
    items, _ = collect_images(root)
    m = mdir.resolve()
    items = [it for it in items if not is_mask_file(Path(it.path), m)]
    return contact_sheet(items, out_png, mask_dir=str(mdir), thumb_px=thumb_px, max_images=max_images)


def mask_overlay(image_path: str | os.PathLike, mask_path: str | os.PathLike, thumb_px: int = 256):
    """A thumbnail of one picture with its mask over it (the masked-out part tinted as in the contact sheet)."""
    from PIL import Image

    from .images import load_rgb
    from .masks import load_mask, tint_masked_out

    img = load_rgb(image_path, draft_px=thumb_px)
    img.thumbnail((thumb_px, thumb_px))
    mask = load_mask(mask_path).resize(img.size, Image.Resampling.BILINEAR)
    return tint_masked_out(img, mask)
