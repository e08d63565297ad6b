"""Bake LoRAs into a base model: one single-file checkpoint (LDM/SGM keys) or a diffusers folder.

A ``.safetensors`` single-file base baked to a single file is streamed, tensor by tensor: the model's layout is
built from the file's header alone (``load_single_file(meta=True)``, which also runs the loader's checks), the
LoRA modules are matched to that layout's layers, and each layer's key in the file is found with the exporter's
own key mapping (:mod:`trainer.models.ldm_export`). The output header (same names, shapes and order; floating
tensors in the output dtype) is written first, then every tensor is read from the base, has its LoRA deltas added
in fp32 when it is a patched weight, is cast once and appended. Memory stays at about one tensor plus the LoRAs,
whatever the checkpoint's size. Keys that are not part of the model (EMA copies, a stored training schedule) are
left out, as the loader ignores them; old SD1 and generative-models SD2 key spellings are written as the loader
reads them.

Any other base (a diffusers folder, a hub id, a weights-only ``.ckpt``) and a ``--diffusers`` output go through
the model: the base is loaded once, in the output dtype, with the project's loader; every LoRA module's delta is
added to its layer in fp32 and cast back, one layer at a time, so the model's weights are never held twice. The
single-file writer (:func:`trainer.models.ldm_export.save_single_file`) then serialises references to those
weights. Nothing is written under the output name until the whole file (or folder) is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from trainer.errors import UserError, first_line

#: the safetensors metadata key (and JSON field) that says which tool made a file
TOOL_KEY = "lorastudio_tool"
#: the JSON written into a ``--diffusers`` folder with the same record the single file carries as metadata
DIFFUSERS_RECORD = "lorastudio_bake.json"

Progress = Callable[[str, int, int], None]


@dataclass
class BakedLora:
    """One LoRA as it went into the checkpoint."""
    path: Path
    name: str
    addnet_hash: str
    te_weight: float
    unet_weight: float
    dyn: int | None
    modules: int  # modules of the file fused into the model (a part at weight 0 adds none)

    def record(self) -> dict:
        return {"file": self.path.name, "sshs_model_hash": self.addnet_hash,
                "te_weight": self.te_weight, "unet_weight": self.unet_weight, "dyn": self.dyn,
                "modules": self.modules}


@dataclass
class BakeResult:
    """What was written: the file or folder, its size in bytes, and each LoRA with the modules fused."""
    path: Path
    size: int
    family: str
    prediction_type: str
    dtype: str
    diffusers: bool
    loras: list[BakedLora] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def size_text(self) -> str:
        """The size as people read it: '2.0 GiB', '16.3 MiB'."""
        n = float(self.size)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        return f"{self.size} B"


def bake(base: str | Path, loras: Sequence, out: str | Path, *, dtype: str = "fp16", diffusers: bool = False,
         overwrite: bool = False, family: str = "auto", allow_partial: bool = False,
         progress: Progress | None = None, stream: bool = True) -> BakeResult:
    """Fuse ``loras`` (``LoraSpec`` or ``FILE:W`` / ``FILE:TE:UNET`` text) into ``base`` and write ``out``.

    ``out`` is a ``.safetensors`` file, or with ``diffusers=True`` a folder. Bad input (files, families, shapes,
    an existing output without ``overwrite``) is a one-line ``UserError`` raised before anything is written.
    A ``.safetensors`` base baked to a single file is streamed tensor by tensor; ``stream=False`` bakes it
    through the loaded model instead, as every other base is (the benchmark compares the two).
    """
    from trainer.lora.io import SAVE_DTYPES

    start = time.perf_counter()
    if dtype not in SAVE_DTYPES:
        raise UserError(f"--dtype {dtype}: not one of {', '.join(SAVE_DTYPES)}", field="dtype")
    torch_dtype = SAVE_DTYPES[dtype]
    out = _check_out(Path(out).expanduser(), diffusers=diffusers, overwrite=overwrite)
    specs = _read_loras(loras, allow_partial, progress)
    if not specs:
        raise UserError("bake: give at least one --lora FILE[:WEIGHT]")
    inputs = {_same_file_key(s[1].path) for s in specs}
    if _same_file_key(out) in inputs:
        raise UserError(f"{out}: the output would overwrite one of the LoRA files; choose another name",
                        path=str(out))
    base_path = Path(str(base)).expanduser()
    if base_path.exists() and _same_file_key(out) == _same_file_key(base_path):
        raise UserError(f"{out}: the output would overwrite the base model; choose another name", path=str(out))

    if stream and not diffusers and base_path.is_file() and base_path.suffix.lower() == ".safetensors":
        return _bake_streaming(str(base), base_path, specs, out, dtype, torch_dtype, family, allow_partial,
                               progress, start)

    _step(progress, "loading base model", 0, 1)
    model = _load_base(str(base), family, torch_dtype)
    _step(progress, "loading base model", 1, 1)

    plan, baked = _match(model, specs, allow_partial)
    _fuse(plan, progress)

    meta = _record(model, baked, dtype)
    _step(progress, "writing", 0, 1)
    _make_folder(out)
    if diffusers:
        size = _write_diffusers(model, out, meta)
    else:
        size = _write_single_file(model, out, meta, torch_dtype)
    _step(progress, "writing", 1, 1)
    return BakeResult(out, size, model.family, model.prediction_type, dtype, diffusers, baked,
                      time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- checks


def _step(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _same_file_key(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def _check_out(out: Path, *, diffusers: bool, overwrite: bool) -> Path:
    flag = "--diffusers" if diffusers else "--out"
    if diffusers:
        if out.exists() and not out.is_dir():
            raise UserError(f"{flag} {out}: a file is there, not a folder; choose another name", path=str(out))
        if out.exists() and not overwrite:
            raise UserError(f"{flag} {out}: the folder exists; give --overwrite to replace it", path=str(out))
    else:
        if out.suffix.lower() != ".safetensors":
            raise UserError(f"{flag} {out}: the checkpoint must be a .safetensors file", path=str(out))
        if out.is_dir():
            raise UserError(f"{flag} {out} is a folder; give a .safetensors file name", path=str(out))
        if out.exists() and not overwrite:
            raise UserError(f"{flag} {out}: the file exists; give --overwrite to replace it", path=str(out))
    folder = out.parent  # created only when the output is written; here its nearest existing ancestor is checked
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {out}: {folder} is a file, so the folder cannot be made", path=str(out))
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {out}: the folder {folder} is not writable", path=str(out))
    return out


def _make_folder(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create its folder ({e.strerror or first_line(e)})", path=str(out)) from None


def _read_loras(loras: Sequence, allow_partial: bool, progress: Progress | None) -> list:
    """[(LoraSpec, LoraFile)] with the weights checked: every file is read before the (slow) model load."""
    from trainer.generate.engine import LoraSpec
    from trainer.generate.library import resolve_lora
    from trainer.lora.io import read_lora

    out = []
    for i, item in enumerate(loras):
        spec = LoraSpec.parse(item) if isinstance(item, str) else item
        what = f"--lora {item}" if isinstance(item, str) else f"LoRA {spec.source}"
        for w, part in ((spec.te, "te weight"), (spec.unet, "unet weight")):
            if not math.isfinite(w):
                raise UserError(f"{what}: the {part} {w!r} is not a number")
        if spec.dyn is not None and (not isinstance(spec.dyn, int) or spec.dyn < 1):
            raise UserError(f"{what}: dyn {spec.dyn!r} must be a whole number >= 1")
        path = resolve_lora(str(spec.source))
        try:
            lora = read_lora(path, allow_partial=allow_partial)
        except UserError:
            raise
        except Exception as e:  # a reader bug must still reach the user as one line naming the file
            raise UserError(f"LoRA file {path}: not a readable LoRA ({type(e).__name__}: {first_line(e)})",
                            path=str(path)) from None
        spec.name = spec.name or path.stem
        out.append((spec, lora))
        _step(progress, "reading LoRAs", i + 1, len(loras))
    return out


def _load_base(source: str, family: str, torch_dtype):
    from trainer.config import ModelConfig
    from trainer.models.loading import load_base_model

    try:
        return load_base_model(ModelConfig(base=source, family=family), dtype=torch_dtype, device="cpu")
    except UserError:
        raise
    except Exception as e:  # whatever a library raises on a damaged file: one line naming the base
        raise UserError(f"{source}: cannot load the base model ({type(e).__name__}: {first_line(e)})",
                        path=source) from None


# ------------------------------------------------------------------------------------------------- fusing


def _match(model, specs: list, allow_partial: bool) -> tuple[dict, list[BakedLora]]:
    """layer -> [(multiplier, LoraModule, dyn)] for every LoRA, and what each LoRA contributes."""
    from trainer.lora.io import match_modules

    plan: dict = {}
    baked = []
    tes = list(model.text_encoders or [])
    for spec, lora in specs:
        targets = match_modules(lora, model.unet, tes, family=model.family, allow_partial=allow_partial)
        if not targets:
            raise UserError(f"{lora.path}: none of its {len(lora.modules)} modules matches a layer of the base "
                            f"model; it was made for another model", path=str(lora.path))
        n = 0
        for key, layer in targets.items():
            m = spec.unet if key.startswith("unet:") else spec.te
            if m == 0:
                continue
            plan.setdefault(layer, []).append((m, lora.modules[key], spec.dyn))
            n += 1
        baked.append(BakedLora(Path(lora.path), str(spec.name), lora.addnet_hash, spec.te, spec.unet, spec.dyn, n))
    return plan, baked


def _fuse(plan: dict, progress: Progress | None) -> None:
    """W = W0 + sum m * ΔW per layer, in fp32, written back in the layer's dtype (in place for fp32).

    A plain LoRA adds m * alpha/rank * up @ down with one ``addmm_`` (no full-size temporary; ``dyn`` keeps its
    first ranks at the file's scale, as the generator does); a Tucker, LoHa or LoKr module adds
    ``LoraModule.delta``; a DoRA module's delta is taken against the layer's original weight W0 (before any LoRA
    of this bake), as the generator fuses it, so only layers with a DoRA module keep an fp32 copy of W0.
    """
    import torch

    total = len(plan)
    with torch.no_grad():
        for i, (layer, items) in enumerate(plan.items()):
            w = layer.weight
            in_place = w.dtype == torch.float32 and w.is_contiguous()
            acc = w.data if in_place else w.detach().to(torch.float32, memory_format=torch.contiguous_format)
            _add_deltas(acc, items)
            if not in_place:
                w.data.copy_(acc)  # one rounding, fp32 -> the layer's dtype
            del acc
            _step(progress, "fusing", i + 1, total)


def _add_deltas(acc, items: list) -> None:
    """acc (a contiguous fp32 weight, or contiguous rows of one) += sum m * ΔW of ``items``, in place."""
    import torch

    w0 = (acc.clone() if any(lm.dora_scale is not None for _, lm, _ in items) else None)
    flat = acc.view(acc.shape[0], -1)
    for m, lm, dyn in items:
        if lm.is_plain:
            r = lm.rank if dyn is None else min(dyn, lm.rank)
            up = lm.up.reshape(lm.up.shape[0], -1)[:, :r].to(flat.device, torch.float32)
            down = lm.down.reshape(lm.rank, -1)[:r].to(flat.device, torch.float32)
            flat.addmm_(up, down, alpha=m * lm.scale)
        elif lm.dora_scale is not None:
            flat.add_(lm.delta(m, base_weight=w0).reshape(flat.shape).to(flat.device))
        else:  # Tucker core, LoHa, LoKr: the module computes the full update (dyn is LoRA's only)
            flat.add_(lm.delta(m, flat.shape).to(flat.device))


# ------------------------------------------------------------------------------------------------- streaming


def _bake_streaming(source: str, path: Path, specs: list, out: Path, dtype: str, torch_dtype, family: str,
                    allow_partial: bool, progress: Progress | None, start: float) -> BakeResult:
    """The single-file bake, one tensor at a time (see the module docstring)."""
    from types import SimpleNamespace

    from trainer.models.ldm_export import modelspec_metadata
    from trainer.models.single_file import MARKER_KEYS, MODEL_PREFIXES, load_single_file, loader_keys

    _step(progress, "loading base model", 0, 1)
    try:
        parts = load_single_file(path, dtype=torch_dtype, meta=True)
    except UserError:
        raise
    except Exception as e:  # whatever a library raises on a damaged file: one line naming the base
        raise UserError(f"{source}: cannot load the base model ({type(e).__name__}: {first_line(e)})",
                        path=source) from None
    if family not in ("auto", parts.family):
        raise UserError(f"{source}: model.family is '{family}' but this is an {parts.family} model; set "
                        f"model.family to 'auto' or '{parts.family}'", field="model.family")
    model = SimpleNamespace(family=parts.family, prediction_type=parts.prediction_type, unet=parts.unet,
                            text_encoders=list(parts.text_encoders), source=source,
                            name=os.path.basename(source.rstrip("/\\")) or source)
    _step(progress, "loading base model", 1, 1)

    plan, baked = _match(model, specs, allow_partial)
    header = _read_header(path)
    _, names = loader_keys(header.tensors, str(path))
    keep = MODEL_PREFIXES[model.family]
    entries = [(new, old) for new, old in names.items() if new.startswith(keep) or new in MARKER_KEYS]
    entries.sort(key=lambda e: header.tensors[e[1]].offsets)  # the base is read front to back
    if model.prediction_type == "v_prediction" and "v_pred" not in names:
        entries.append(("v_pred", None))  # ComfyUI's marker, as the exporter writes it
    targets = _locate(model, plan, {new for new, _ in entries}, path)

    meta = {**modelspec_metadata(model.family, model.prediction_type == "v_prediction"),
            "modelspec.title": out.stem, **_record(model, baked, dtype)}
    _make_folder(out)
    size = _write_streamed(header, entries, targets, out, meta, torch_dtype, progress)
    return BakeResult(out, size, model.family, model.prediction_type, dtype, False, baked,
                      time.perf_counter() - start)


def _read_header(path: Path):
    from trainer.common.safetensors_header import read_header
    return read_header(path)


def _locate(model, plan: dict, keys: set, path: Path) -> dict[str, list]:
    """single-file key -> [(rows or None, plan items)] for every patched layer of the (meta) model."""
    from trainer.lora.keymap import TE_COMPONENTS, te_canonical_path
    from trainer.models.ldm_export import clip_layer_to_ldm, unet_to_ldm
    from trainer.models.single_file import SD1_TE, SD2_TE, SDXL_TE1, SDXL_TE2

    te_prefix = {"sd1": [(SD1_TE, False)], "sd2": [(SD2_TE, True)],
                 "sdxl": [(SDXL_TE1, False), (SDXL_TE2, True)]}[model.family]
    where = {}
    for path_, layer in model.unet.named_modules():
        if layer in plan:
            (key,) = unet_to_ldm({f"{path_}.weight": None}, model.unet.config)
            where[layer] = (key, None)
    for i, te in enumerate(model.text_encoders):
        prefix, openclip = te_prefix[i]
        for path_, layer in te.named_modules():
            if layer in plan:
                canon = te_canonical_path(path_)
                if canon is None:
                    raise UserError(f"{path}: the text-encoder layer {TE_COMPONENTS[i]}:{path_} has no place in "
                                    "the single-file layout", path=str(path))
                where[layer] = clip_layer_to_ldm(canon, prefix, openclip=openclip,
                                                 hidden=te.config.hidden_size)
    targets: dict[str, list] = {}
    for layer, items in plan.items():
        key, rows = where[layer]
        if key not in keys:
            raise UserError(f"{path}: the checkpoint has no {key}, which a LoRA module patches; the file's "
                            "layout is not one LoRA Studio can bake into", path=str(path))
        targets.setdefault(key, []).append((rows, items))
    return targets


def _write_streamed(header, entries: list, targets: dict, out: Path, meta: dict, torch_dtype,
                    progress: Progress | None) -> int:
    """Write the output's header from the input's (same shapes, floating tensors in ``torch_dtype``), then each
    tensor in turn, under a temporary name that becomes ``out`` only once the file is complete."""
    import struct

    import torch

    from trainer.models.single_file import _ST_DTYPES

    to_st = {v: k for k, v in _ST_DTYPES.items()}
    out_name = str(torch_dtype).removeprefix("torch.")
    plan = []  # (out key, in key, in dtype, out dtype, shape)
    head: dict = {"__metadata__": {k: str(v) for k, v in meta.items()}}
    offset = 0
    for new, old in entries:
        info = header.tensors[old] if old is not None else None
        src = _ST_DTYPES[info.dtype] if info is not None else out_name
        dst = out_name if getattr(torch, src).is_floating_point else src
        shape = list(info.shape) if info is not None else [0]
        n = math.prod(shape) * getattr(torch, dst).itemsize
        head[new] = {"dtype": to_st[dst], "shape": shape, "data_offsets": [offset, offset + n]}
        plan.append((new, old, src, dst, shape, n))
        offset += n
    blob = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    tmp = _temp_name(out, "partial.safetensors")
    try:
        with open(header.path, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(struct.pack("<Q", len(blob)))
            fout.write(blob)
            for i, (new, old, src, dst, shape, n) in enumerate(plan):
                if old is None:
                    t = torch.zeros(shape, dtype=getattr(torch, dst))
                else:
                    t = _read_tensor(fin, header, old, getattr(torch, src), shape)
                    if new in targets:
                        t = t.to(torch.float32, copy=True)
                        with torch.no_grad():
                            for rows, items in targets[new]:
                                _add_deltas(t if rows is None else t[rows[0]:rows[1]], items)
                    t = t.to(getattr(torch, dst))  # one rounding
                data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes != n:  # cannot happen for a valid header; never write a wrong file
                    raise UserError(f"{header.path}: tensor {old} does not have the size its header gives",
                                    path=str(header.path))
                fout.write(memoryview(data))
                del t, data
                _step(progress, "writing", i + 1, len(plan))
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"{out}: could not write the checkpoint ({e.strerror or first_line(e)})",
                        path=str(out)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out.stat().st_size


def _read_tensor(f, header, key: str, dtype, shape: list):
    """One tensor of the base, read with plain file reads (no memory map, so nothing of the file stays resident)."""
    import torch

    begin, end = header.tensors[key].offsets
    buf = bytearray(end - begin)
    f.seek(header.data_start + begin)
    if f.readinto(buf) != len(buf):
        raise UserError(f"{header.path}: the file ends inside tensor {key} (an interrupted download?)",
                        path=str(header.path))
    if not buf:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


# ------------------------------------------------------------------------------------------------- writing


def _record(model, baked: list[BakedLora], dtype: str) -> dict[str, str]:
    """How the checkpoint was made, as string metadata (single file) or JSON fields (diffusers folder).

    Files are named without their folders (a shared checkpoint should not carry the maker's paths); a hub id
    stays whole.
    """
    from trainer import __version__
    from trainer.common.names import looks_like_hub_id

    return {
        TOOL_KEY: "bake",
        "lorastudio_version": __version__,
        "lorastudio_base": model.source if looks_like_hub_id(model.source) else model.name,
        "lorastudio_family": model.family,
        "lorastudio_dtype": dtype,
        "lorastudio_loras": json.dumps([b.record() for b in baked], ensure_ascii=False),
        "lorastudio_baked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _temp_name(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.{tag}")


def _write_single_file(model, out: Path, meta: dict, torch_dtype) -> int:
    from trainer.models.ldm_export import save_single_file

    pipe = model.make_pipeline()
    tmp = _temp_name(out, "partial.safetensors")
    leftovers = (tmp, tmp.with_name(tmp.name + ".tmp"))  # save_single_file's own temporary
    try:
        save_single_file(pipe, tmp, dtype=torch_dtype, metadata={**meta, "modelspec.title": out.stem})
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"{out}: could not write the checkpoint ({e.strerror or first_line(e)})",
                        path=str(out)) from None
    finally:
        for p in leftovers:
            p.unlink(missing_ok=True)
    return out.stat().st_size


def _write_diffusers(model, out: Path, meta: dict) -> int:
    import diffusers.utils.logging as dlog

    pipe = model.make_pipeline()
    bar = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()  # its per-shard bar would run over the caller's progress
    tmp = _temp_name(out, "partial")
    old = _temp_name(out, "old")
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        record = {k: (json.loads(v) if k == "lorastudio_loras" else v) for k, v in meta.items()}
        (tmp / DIFFUSERS_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        moved = out.exists()
        if moved:  # --overwrite: the old folder steps aside, and comes back if the new one cannot take its place
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if moved:
                os.replace(old, out)
            raise
    except OSError as e:
        raise UserError(f"{out}: could not write the diffusers folder ({e.strerror or first_line(e)})",
                        path=str(out)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        if bar:
            dlog.enable_progress_bar()
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
