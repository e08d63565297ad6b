"""Training data: image list, buckets, caption processing, latent and text-encoder-output caches, batches."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datasets_tools.bucketing import apply_crop, bucket_batches, crop_plan, make_buckets, plan_image
from datasets_tools.folder import collect_images
from datasets_tools.images import ImageError, load_rgb

from trainer.config import Config
from trainer.errors import UserError


@dataclass
class Example:
    """One image of the training set (repeats are applied when batches are made)."""
    path: Path
    caption: str
    repeats: int
    subset: str
    is_reg: bool
    size: tuple[int, int]          # original (w, h) after EXIF orientation
    bucket: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    resized: tuple[int, int]
    upscaled: bool
    mask: Path | None = None       # its mask file (data.mask_dir)
    alpha_mask: bool = False       # its alpha channel is its mask (data.alpha_mask)

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.alpha_mask


@dataclass
class TrainData:
    examples: list[Example]
    warnings: list[str] = field(default_factory=list)
    skipped: int = 0
    #: held-out images for the validation loss (data.validation_dir or data.validation_split)
    validation: list[Example] = field(default_factory=list)

    @property
    def masked(self) -> bool:
        return any(e.masked for e in self.examples)

    @property
    def train_examples(self) -> list[Example]:
        return [e for e in self.examples if not e.is_reg]

    def epoch_items(self) -> list[int]:
        """Example indices with repeats applied (one entry per use in an epoch)."""
        return [i for i, e in enumerate(self.examples) for _ in range(e.repeats)]

    def batches(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        items = self.epoch_items()
        per_item = [self.examples[i].bucket for i in items]
        return [[items[j] for j in b] for b in bucket_batches(per_item, batch_size, seed=seed, epoch=epoch)]

    def stats(self) -> dict:
        """Dataset description for the LoRA metadata (kohya's ss_dataset_dirs / ss_tag_frequency / ss_bucket_info)."""
        dirs: dict[str, dict] = {}
        tags: dict[str, Counter] = {}
        for e in self.train_examples:
            d = dirs.setdefault(e.subset, {"n_repeats": e.repeats, "img_count": 0})
            d["img_count"] += 1
            c = tags.setdefault(e.subset, Counter())
            for t in (t.strip().lower() for t in e.caption.split(",")):
                if t:
                    c[t] += 1
        buckets = Counter(e.bucket for e in self.train_examples)
        bucket_info = {"buckets": {str(i): {"resolution": list(b), "count": n}
                                   for i, (b, n) in enumerate(sorted(buckets.items()))},
                       "mean_img_ar_error": float(np.mean([abs(e.size[0] / e.size[1] - e.bucket[0] / e.bucket[1])
                                                           for e in self.train_examples]))}
        reg_dirs: dict[str, dict] = {}
        for e in self.examples:
            if e.is_reg:
                d = reg_dirs.setdefault(e.subset, {"n_repeats": e.repeats, "img_count": 0})
                d["img_count"] += 1
        return {"dataset_dirs": dirs, "tag_frequency": {k: dict(v) for k, v in tags.items()},
                "bucket_info": bucket_info,
                "num_train_images": sum(e.repeats for e in self.train_examples),
                "num_reg_images": sum(e.repeats for e in self.examples if e.is_reg), "reg_dataset_dirs": reg_dirs}


def _collect(root: str, cfg: Config, is_reg: bool, warn: Callable[[str], None],
             key: str = "") -> tuple[list, int]:
    key = key or ("data.reg_dir" if is_reg else "data.dir")
    p = Path(root).expanduser()
    if not p.exists():
        raise UserError(f"{key}: folder not found: {p}", field=key, path=str(p))
    if not p.is_dir():
        raise UserError(f"{key}: {p} is not a folder", field=key, path=str(p))
    items, problems = collect_images(p, caption_extension=cfg.data.caption_extension,
                                     default_caption=cfg.data.default_caption, default_repeats=cfg.data.repeats)
    skipped = 0
    missing = [pr for pr in problems if pr.kind == "missing_caption"]
    for pr in problems:
        if pr.kind != "missing_caption":
            skipped += 1
            warn(f"skipped {pr.path}: {pr.message}")
    if missing:
        fallback = f"the default caption {cfg.data.default_caption!r}" if cfg.data.default_caption else \
            "an empty caption (set data.default_caption, e.g. your trigger word)"
        names = ", ".join(Path(pr.path).name for pr in missing[:5]) + (" ..." if len(missing) > 5 else "")
        warn(f"{len(missing)} image(s) have no {cfg.data.caption_extension} caption and use {fallback}: {names}")
    return items, skipped


def build_data(cfg: Config, warn: Callable[[str], None]) -> TrainData:
    """Collect images (and regularisation images), assign buckets and crops, attach masks, hold out the
    validation images; refuse an unusable folder."""
    items, skipped = _collect(cfg.data.dir, cfg, False, warn)
    if not items:
        raise UserError(f"data.dir: no usable image in {cfg.data.dir}"
                        + (f" ({skipped} file(s) skipped, see warnings)" if skipped else ""), field="data.dir")
    reg_items: list = []
    if cfg.data.reg_dir:
        reg_items, s2 = _collect(cfg.data.reg_dir, cfg, True, warn)
        skipped += s2
        if not reg_items:
            raise UserError(f"data.reg_dir: no usable image in {cfg.data.reg_dir}", field="data.reg_dir")
    d = cfg.data
    buckets = make_buckets(d.resolution, d.min_bucket_px, d.max_bucket_px, d.bucket_step_px)

    def example(it, is_reg: bool) -> Example:
        # The same call as the bucket preview, so what the user saw is what is trained.
        plan = plan_image(it.width, it.height, resolution=d.resolution, min_px=d.min_bucket_px,
                          max_px=d.max_bucket_px, step=d.bucket_step_px, no_upscale=d.bucket_no_upscale,
                          enable_bucket=d.enable_bucket, buckets=buckets)
        return Example(Path(it.path), it.caption, it.repeats, it.subset, is_reg, (it.width, it.height),
                       tuple(plan.bucket), tuple(plan.box), tuple(plan.resized), plan.upscaled)

    train = [example(it, False) for it in items]
    _attach_masks(cfg, train, warn)
    validation = _validation_examples(cfg, train, example, warn)
    held = {e.path for e in validation}
    train = [e for e in train if e.path not in held]
    examples = train + [example(it, True) for it in reg_items]
    _warn_long_captions(cfg, examples + validation, warn)
    return TrainData(examples, skipped=skipped, validation=validation)


def _warn_long_captions(cfg: Config, examples: list[Example], warn: Callable[[str], None]) -> None:
    """One warning per caption file longer than data.max_token_length (the tokens after it are cut in training)."""
    from datasets_tools.folder import caption_path
    limit = cfg.data.max_token_length
    # every CLIP token covers at least one UTF-8 byte that is not a space: shorter captions need no tokenizer
    long = {}
    for e in examples:
        if len(e.caption.encode("utf-8")) - e.caption.count(" ") > limit:
            long.setdefault(e.caption, []).append(e)
    if not long:
        return
    from trainer.common.prompt_encoding import count_tokens
    from trainer.config.schema import MAX_TOKEN_LENGTHS
    from trainer.models.tokenizers import clip_tokenizer  # the vocabulary of every SD1/SD2/SDXL tokenizer
    ext = cfg.data.caption_extension if cfg.data.caption_extension.startswith(".") else "." + cfg.data.caption_extension
    captions, told = list(long), set()
    for caption, n in zip(captions, count_tokens(clip_tokenizer(), captions)):
        if n <= limit:
            continue
        bigger = [m for m in MAX_TOKEN_LENGTHS if m >= n]
        fix = f"set data.max_token_length to {bigger[0]}" if bigger else "shorten it"
        for e in long[caption]:
            cap = caption_path(e.path, ext)
            source = str(cap) if cap.is_file() else f"{e.path} (data.default_caption)"
            if source in told:
                continue
            told.add(source)
            warn(f"{source}: caption is {n} tokens, longer than data.max_token_length ({limit}); training cuts "
                 f"it after token {limit} ({fix})")


def _attach_masks(cfg: Config, examples: list[Example], warn: Callable[[str], None]) -> None:
    """data.mask_dir / data.alpha_mask onto the training images (regularisation images train everywhere)."""
    from datasets_tools.masks import check_mask, mask_index
    d = cfg.data
    if d.alpha_mask:
        for e in examples:
            e.alpha_mask = True  # an image without transparency trains everywhere
    if not d.mask_dir:
        return
    root = Path(d.mask_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"data.mask_dir: folder not found: {root}", field="data.mask_dir", path=str(root))
    index = mask_index(root)
    matched = 0
    for e in examples:
        mask = index.get(e.path.stem)
        if mask is None:
            continue
        problem = check_mask(mask, e.size, e.path.name)
        if problem is not None and problem.kind != "mask_empty":
            raise UserError(f"data.mask_dir: {problem.message}", field="data.mask_dir", path=str(mask))
        if problem is not None:
            warn(problem.message)
        e.mask = mask
        matched += 1
    if not matched:
        raise UserError(f"data.mask_dir: no mask in {root} matches an image of {d.dir} (a mask is named after "
                        f"its image's file stem, e.g. masks/cat.png for cat.jpg)", field="data.mask_dir")
    if matched < len(examples):
        warn(f"data.mask_dir: {len(examples) - matched} of {len(examples)} images have no mask in {root} and "
             "train everywhere")


def _validation_examples(cfg: Config, train: list[Example], example, warn) -> list[Example]:
    """The validation images: a folder of their own, or a seeded share held out of the training images."""
    d = cfg.data
    if d.validation_dir:
        items, _ = _collect(d.validation_dir, cfg, False, warn, key="data.validation_dir")
        if not items:
            raise UserError(f"data.validation_dir: no usable image in {d.validation_dir}",
                            field="data.validation_dir")
        return [example(it, False) for it in items]
    if d.validation_split <= 0:
        return []
    n = max(1, round(d.validation_split * len(train)))
    if n >= len(train):
        raise UserError(f"data.validation_split: holding out {n} of {len(train)} training images leaves none to "
                        "train on; lower the split or add images", field="data.validation_split")
    order = sorted(range(len(train)), key=lambda i: str(train[i].path))
    held = sorted(random.Random(cfg.train.seed).sample(order, n))
    return [train[i] for i in held]


def load_pixels(ex: Example, flip: bool = False) -> torch.Tensor:
    """Decode, orient, convert, resize and crop exactly as the bucket preview shows; [-1, 1] CHW float."""
    img = apply_crop(load_rgb(ex.path), crop_plan(ex.size[0], ex.size[1], ex.bucket))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_mask(ex: Example, flip: bool = False, size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """The example's mask on the latent grid (1 x h x w, 0..1; ``size`` = the latents' (h, w), default the
    bucket / 8), cropped exactly as its picture; None if it has none (trains everywhere)."""
    from datasets_tools.masks import load_alpha, load_mask as read_mask
    img = read_mask(ex.mask) if ex.mask is not None else (load_alpha(ex.path) if ex.alpha_mask else None)
    if img is None:
        return None
    img = apply_crop(img, crop_plan(ex.size[0], ex.size[1], ex.bucket), mode="L")
    m = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
    if flip:
        m = m.flip(-1)
    w, h = ex.bucket
    return torch.nn.functional.adaptive_avg_pool2d(m, size or (h // 8, w // 8))[0]


def process_caption(caption: str, cfg: Config, rng: random.Random) -> str:
    """Caption dropout, then tag shuffle keeping the first keep_tokens tags in place."""
    d = cfg.data
    if d.caption_dropout > 0 and rng.random() < d.caption_dropout:
        return ""
    if d.shuffle_caption:
        tags = [t.strip() for t in caption.split(",")]
        tags = [t for t in tags if t]
        head, tail = tags[:d.keep_tokens], tags[d.keep_tokens:]
        rng.shuffle(tail)
        return ", ".join(head + tail)
    return caption


def captions_are_static(cfg: Config) -> bool:
    """Dropout is fine for a cache (the empty caption is cached too); shuffling is not."""
    return not cfg.data.shuffle_caption


# ------------------------------------------------------------------------------------------------ latents

def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vae_fingerprint(vae) -> str:
    """Identifies the VAE for the disk cache: its config and a few weight bytes (cheap, changes with weights)."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for i, (_, p) in enumerate(vae.state_dict().items()):
        if i % 16 == 0:
            h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


class LatentCache:
    """Latents per (example, flip), encoded once; optionally persisted on disk keyed by content and settings."""

    def __init__(self, data: TrainData, vae, *, device, dtype, disk_dir: Path | None, flip: bool):
        self.data, self.vae, self.device, self.dtype = data, vae, device, dtype
        self.disk_dir = disk_dir
        self.flips = (False, True) if flip else (False,)
        self.mem: dict[tuple[int, bool], torch.Tensor] = {}
        self.masks: dict[tuple[int, bool], torch.Tensor] = {}  # on the latent grid, cached with the latents
        self._fp = vae_fingerprint(vae) if disk_dir else ""
        self.encoded = 0  # latents this process encoded (the rest came from the disk cache)

    def _key(self, i: int, flip: bool) -> str:
        ex = self.data.examples[i]
        s = json.dumps([_file_digest(ex.path), ex.bucket, ex.crop_box, ex.resized, flip, self._fp])
        return hashlib.sha256(s.encode()).hexdigest()[:32]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float()  # the mode: deterministic, as kohya's cache effectively is at small std

    def build(self, indices: list[int], progress: Callable[[int, int], bool | None],
              skip: Callable[[int, str], None], batch_size: int = 1) -> bool:
        """Encode every (example, flip) once, in batches of up to batch_size pictures of one bucket; entries of
        the disk cache are read instead. Examples that fail to decode are reported through skip().

        ``progress(done, total)`` runs after each batch; when it returns False the build stops there and
        returns False (a Stop pressed while caching). Returns True when every latent is in the cache.
        """
        todo = [(i, f) for i in indices for f in self.flips if (i, f) not in self.mem]
        done, misses = 0, []
        for i, f in todo:
            if self._from_disk(i, f):
                done += 1
                if progress(done, len(todo)) is False:
                    return False
            else:
                misses.append((i, f))
        by_bucket: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for i, f in misses:
            by_bucket.setdefault(self.data.examples[i].bucket, []).append((i, f))
        for group in by_bucket.values():
            for k in range(0, len(group), max(1, batch_size)):
                chunk = group[k:k + max(1, batch_size)]
                self._encode_batch(chunk, skip)
                done += len(chunk)
                if progress(done, len(todo)) is False:
                    return False
        return True

    def _disk_path(self, i: int, f: bool) -> Path | None:
        return self.disk_dir / f"{self._key(i, f)}.safetensors" if self.disk_dir is not None else None

    def _from_disk(self, i: int, f: bool) -> bool:
        from safetensors.torch import load_file
        path = self._disk_path(i, f)
        if path is None or not path.exists():
            return False
        try:
            self._store(i, f, load_file(str(path))["latent"])
            return True
        except Exception:  # a damaged cache entry is just re-made
            path.unlink(missing_ok=True)
            return False

    def _encode_batch(self, chunk: list[tuple[int, bool]], skip: Callable[[int, str], None]) -> None:
        from safetensors.torch import save_file
        pixels, ok = [], []
        for i, f in chunk:
            try:
                pixels.append(load_pixels(self.data.examples[i], f))
                ok.append((i, f))
            except ImageError as e:
                msg = str(e)
                prefix = f"{self.data.examples[i].path}: "
                skip(i, msg[len(prefix):] if msg.startswith(prefix) else msg)
        if not ok:
            return
        lats = self.encode(torch.stack(pixels)).cpu()
        self.encoded += len(ok)
        for (i, f), lat in zip(ok, lats):
            lat = lat.clone()
            self._store(i, f, lat)
            path = self._disk_path(i, f)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")  # several processes may share the folder
                save_file({"latent": lat.contiguous()}, str(tmp))
                tmp.replace(path)

    def _store(self, i: int, f: bool, lat: torch.Tensor) -> None:
        self.mem[(i, f)] = lat
        ex = self.data.examples[i]
        if ex.masked:
            mask = load_mask(ex, f, tuple(lat.shape[-2:]))
            if mask is not None:
                self.masks[(i, f)] = mask

    def get_mask(self, i: int, flip: bool) -> torch.Tensor | None:
        return self.masks.get((i, flip))

    def keep(self, remap: dict[int, int]) -> None:
        """Only the examples in remap (old index -> new index) stay, renumbered."""
        self.mem = {(remap[i], f): v for (i, f), v in self.mem.items() if i in remap}
        self.masks = {(remap[i], f): v for (i, f), v in self.masks.items() if i in remap}

    def get(self, i: int, flip: bool) -> torch.Tensor:
        hit = self.mem.get((i, flip))
        if hit is not None:
            return hit
        return self.encode(load_pixels(self.data.examples[i], flip)[None])[0]
