"""Bucket preview: each image's bucket and crop box (the trainer's own plan_image), counts, warnings, contact sheet."""

from __future__ import annotations

import io
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .bucketing import make_buckets, plan_image
from .captions import atomic_write_bytes
from .errors import DatasetError
from .folder import collect_images
from .images import ImageError, load_rgb
from .masks import load_mask, mask_index


@dataclass
class PreviewRow:
    path: str
    width: int
    height: int
    bucket: tuple[int, int]
    resized: tuple[int, int]
    box: tuple[int, int, int, int]  # crop box in resized coordinates, exactly what the trainer crops
    upscaled: bool
    repeats: int = 1

    def box_in_image(self) -> tuple[float, float, float, float]:
        """The crop box in the image's own (upright) pixels."""
        s = self.width / self.resized[0]
        left, top, right, bottom = self.box
        return (left * s, top * s, right * s, bottom * s)


@dataclass
class BucketPreview:
    root: str
    rows: list[PreviewRow] = field(default_factory=list)
    buckets: dict[str, dict] = field(default_factory=dict)  # "WxH" -> {"images", "samples"}
    warnings: list[str] = field(default_factory=list)
    mask_dir: str = ""  # masks drawn over the pictures in the contact sheet (data.mask_dir)

    def to_dict(self) -> dict:
        return {"root": self.root, "buckets": self.buckets, "warnings": self.warnings, "mask_dir": self.mask_dir,
                "images": [asdict(r) for r in self.rows]}


def _summarise(preview: BucketPreview, batch_size: int) -> BucketPreview:
    counts: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for r in preview.rows:
        counts[r.bucket][0] += 1
        counts[r.bucket][1] += r.repeats
    preview.buckets = {f"{w}x{h}": {"images": c[0], "samples": c[1]} for (w, h), c in sorted(counts.items())}
    for name, c in preview.buckets.items():
        if c["samples"] < batch_size:
            preview.warnings.append(f"bucket {name} has {c['samples']} sample(s) per epoch, fewer than the batch "
                                    f"size {batch_size}: its batches will be smaller (kept, not dropped)")
    ups = [r.path for r in preview.rows if r.upscaled]
    if ups:
        preview.warnings.append(f"{len(ups)} image(s) will be upscaled to their bucket, e.g. {ups[0]}")
    return preview


def bucket_preview(source, *, resolution: int = 512, min_px: int = 256, max_px: int = 1024, step: int = 64,
                   no_upscale: bool = False, enable_bucket: bool = True, batch_size: int = 1,
                   caption_extension: str = ".txt", mask_dir: str | os.PathLike = "") -> BucketPreview:
    """Bucket and crop for every image, from a folder, a list of ImageItem, or a ScanReport (settings from it)."""
    from .scan import ScanReport

    if isinstance(source, ScanReport):
        rows = [PreviewRow(r.path, r.width, r.height, tuple(r.bucket), tuple(r.resized), tuple(r.crop_box),
                           r.upscaled, r.repeats) for r in source.usable_images()]
        pv = BucketPreview(source.root, rows, mask_dir=str(source.settings.get("mask_dir") or ""))
        return _summarise(pv, int(source.settings.get("batch_size", 1)))
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        items, _ = collect_images(root, caption_extension=caption_extension)
    else:
        items, root = list(source), None
    buckets = make_buckets(resolution, min_px, max_px, step) if enable_bucket else None
    preview = BucketPreview(str(root.resolve()) if root else "", mask_dir=str(mask_dir or ""))
    for it in items:
        plan = plan_image(it.width, it.height, resolution=resolution, min_px=min_px, max_px=max_px, step=step,
                          no_upscale=no_upscale, enable_bucket=enable_bucket, buckets=buckets)
        rel = Path(it.path).relative_to(root).as_posix() if root else str(it.path)
        preview.rows.append(PreviewRow(rel, it.width, it.height, plan.bucket, plan.resized, plan.box,
                                       plan.upscaled, it.repeats))
    return _summarise(preview, batch_size)


def format_preview(preview: BucketPreview, max_rows: int = 30) -> str:
    lines = [f"{'image':<40} {'size':>11} {'bucket':>10}  crop box (in image px)"]
    for r in preview.rows[:max_rows]:
        box = ",".join(str(round(v)) for v in r.box_in_image())
        lines.append(f"{r.path[-40:]:<40} {r.width:>5}x{r.height:<5} {r.bucket[0]:>4}x{r.bucket[1]:<5} {box}"
                     + ("  (upscaled)" if r.upscaled else ""))
    if len(preview.rows) > max_rows:
        lines.append(f"... {len(preview.rows) - max_rows} more (see the JSON report)")
    lines += [f"warning: {w}" for w in preview.warnings]
    return "\n".join(lines)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: bitmap font, fixed size
        return ImageFont.load_default()


def contact_sheet(source, out_png: str | os.PathLike, *, thumb_px: int = 192, columns: int | None = None,
                  max_images: int = 400, root: str | os.PathLike | None = None, **settings) -> Path:
    """Draw each image's thumbnail with the trainer's crop box (outside dimmed) and its bucket label.

    source: a ScanReport, a BucketPreview, a folder or a list of ImageItem (settings as for bucket_preview).
    Images are grouped by bucket; at most max_images are drawn so a 10,000-image folder stays a usable PNG.
    """
    preview = source if isinstance(source, BucketPreview) else bucket_preview(source, **settings)
    base = Path(root or preview.root) if (root or preview.root) else None
    masks = mask_index(preview.mask_dir) if preview.mask_dir and Path(preview.mask_dir).is_dir() else {}
    rows = sorted(preview.rows, key=lambda r: (r.bucket, r.path))[:max_images]
    if not rows:
        raise DatasetError("no usable images to draw in the contact sheet")
    cols = columns or max(1, min(len(rows), round(len(rows) ** 0.5 * 1.3)))
    label_h = 30
    cell_w, cell_h = thumb_px + 8, thumb_px + label_h + 8
    n_rows = (len(rows) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, n_rows * cell_h), (32, 32, 36))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for i, r in enumerate(rows):
        x0, y0 = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        path = (base / r.path) if base is not None and not Path(r.path).is_absolute() else Path(r.path)
        t = thumb_px / max(r.width, r.height)
        tw, th = max(1, round(r.width * t)), max(1, round(r.height * t))
        ox, oy = x0 + (thumb_px - tw) // 2, y0 + (thumb_px - th) // 2
        try:
            thumb = load_rgb(path, draft_px=thumb_px).resize((tw, th), Image.Resampling.BILINEAR)
        except ImageError:
            thumb = Image.new("RGB", (tw, th), (90, 20, 20))
        mask = masks.get(Path(r.path).stem)
        if mask is not None:  # the masked-out part tinted blue: what the masked loss ignores
            try:
                m = load_mask(mask).resize((tw, th), Image.Resampling.BILINEAR)
                thumb = Image.composite(thumb, Image.blend(thumb, Image.new("RGB", (tw, th), (40, 90, 255)), 0.6), m)
            except ImageError:
                pass
        # Dim what the crop throws away, so the kept region reads at a glance.
        left, top, right, bottom = (v * t for v in r.box_in_image())
        dim = Image.eval(thumb, lambda v: v // 3)
        dim.paste(thumb.crop((round(left), round(top), round(right), round(bottom))), (round(left), round(top)))
        sheet.paste(dim, (ox, oy))
        draw.rectangle((ox + left, oy + top, ox + right - 1, oy + bottom - 1), outline=(255, 210, 0), width=2)
        label = f"{r.bucket[0]}x{r.bucket[1]}" + (" upscaled" if r.upscaled else "")
        draw.text((x0, y0 + thumb_px + 2), label, fill=(255, 80, 80) if r.upscaled else (230, 230, 230), font=font)
        draw.text((x0, y0 + thumb_px + 15), Path(r.path).name[:30], fill=(160, 160, 170), font=font)
    out = Path(out_png)
    if not out.parent.exists():
        raise DatasetError(f"folder for the contact sheet does not exist: {out.parent}", path=str(out))
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as e:
        raise DatasetError(f"cannot write contact sheet {out}: {e.strerror or e}", path=str(out)) from None
    return out
