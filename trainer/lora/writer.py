"""Write a trained adapter as a kohya-format LoRA (and optionally diffusers' file), then prove it reloads (docs/lora-format.md, 'Atomic write and self-check')."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

from trainer.common.safetensors_header import header_length
from trainer.errors import UserError
from trainer.lora.form import SAVE_DTYPES, SavedLora, _check_family, lora_addnet_hash
from trainer.lora.keymap import TE_COMPONENTS, UnetLayout, kohya_te_name, kohya_unet_name, te_canonical_path
from trainer.lora.match import match_modules
from trainer.lora.reader import read_lora


def hashed_safetensors(tensors: dict, metadata: dict[str, str]) -> tuple[bytes, str, dict[str, str]]:
    """Serialise once; the hash covers only the bytes after the header, so it goes into the metadata afterwards
    unchanged (docs/lora-format.md, 'Hashes'). Returns (file bytes, digest, the metadata written)."""
    from safetensors.torch import save as st_save
    blob = st_save(tensors)
    digest = hashlib.sha256(memoryview(blob)[8 + header_length(blob):]).hexdigest()
    md = dict(metadata)
    md["sshs_model_hash"] = digest
    md["modelspec.hash_sha256"] = "0x" + digest
    return _with_metadata(blob, md), digest, md


def _with_metadata(blob: bytes, metadata: dict[str, str]) -> bytes:
    """Replace the metadata of an in-memory safetensors blob without touching (or re-serialising) the tensor data."""
    n = header_length(blob)
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to a multiple of 8 with spaces
    return struct.pack("<Q", len(raw)) + raw + blob[8 + n:]


# ================================================================================================== writing

def _adapter_layers(unet, text_encoders, adapter_name):
    from trainer.lora.inject import lora_modules
    return lora_modules(unet, text_encoders, adapter_name)


def _file_alpha(layer, adapter_name: str) -> float:
    """The alpha to store so that every reader's alpha/r equals the trained PEFT scaling (docs/lora-format.md, 'Alpha and scale')."""
    r = layer.r[adapter_name]
    alpha = float(layer.lora_alpha[adapter_name])
    if layer.use_rslora.get(adapter_name, False):
        alpha = alpha * math.sqrt(r)
    return alpha


def _module_tensors(layer, adapter_name: str) -> dict[str, torch.Tensor]:
    """One trained peft layer as kohya/LyCORIS tensors (docs/lora-format.md, 'Tensors and shapes', 'DoRA and
    LyCORIS'); ``alpha`` is fp32, the others are cast by the caller."""
    from peft.tuners.lora import LoraLayer

    from trainer.lora.inject import adapter_tensors
    t = {k: v.detach() for k, v in adapter_tensors(layer, adapter_name).items()}
    if isinstance(layer, LoraLayer):
        if layer.lora_bias.get(adapter_name, False):
            raise RuntimeError("a LoRA bias, which the kohya format cannot carry")
        if "magnitude" not in t:  # LoRA / LoCon: unchanged since the first release
            return {"lora_down.weight": t["lora_A"], "lora_up.weight": t["lora_B"],
                    "alpha": torch.tensor(_file_alpha(layer, adapter_name), dtype=torch.float32)}
        from trainer.lora.dora import ColumnDora
        if not isinstance(layer.lora_magnitude_vector[adapter_name], ColumnDora):
            raise RuntimeError("peft's own DoRA (a magnitude per output row), which A1111 cannot apply and ComfyUI "
                               "applies differently; train it with lora.type = dora (docs/lora-format.md, "
                               "'DoRA and LyCORIS')")
        # DoRA: A1111 applies the DoRA norm to up @ down *before* its alpha/r, so the scale is folded into
        # lora_up and alpha = rank (scale 1) makes A1111 and ComfyUI compute the same W'
        base = layer.get_base_layer().weight
        r = int(t["lora_A"].shape[0])
        return {"lora_down.weight": t["lora_A"], "lora_up.weight": t["lora_B"].float() * layer.scaling[adapter_name],
                "dora_scale": t["magnitude"].float().reshape(1, base.shape[1], *[1] * (base.dim() - 2)),
                "alpha": torch.tensor(float(r), dtype=torch.float32)}
    alpha = torch.tensor(float(layer.alpha[adapter_name]), dtype=torch.float32)
    if "lokr_w1_b" not in t and "lokr_w2_b" not in t and "lokr_w1" in t:
        # both LoKr factors full: every reader uses scale 1 there, so peft's alpha/r goes into lokr_w1
        t["lokr_w1"] = t["lokr_w1"].float() * layer.scaling[adapter_name]
    return {**t, "alpha": alpha}


def kohya_module_name(component: str, path: str, family: str, layout: UnetLayout) -> str:
    if component == "unet":
        return kohya_unet_name(path, family, layout)
    index = TE_COMPONENTS.index(component)
    return kohya_te_name(path, index, 2 if family == "sdxl" else 1)



def kohya_state_dict(unet, text_encoders: list, *, family: str, save_precision: str = "fp16",
                     adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], list]:
    """The tensors of the kohya file (docs/lora-format.md, 'Tensors and shapes') and the (component, path, layer, name) list they came from."""
    _check_family(family)
    dtype = SAVE_DTYPES[save_precision]
    layout = UnetLayout.from_unet(unet)
    tensors: dict[str, torch.Tensor] = {}
    written = []
    for component, path, layer in _adapter_layers(unet, text_encoders, adapter_name):
        name = kohya_module_name(component, path, family, layout)
        if name + ".alpha" in tensors:
            raise RuntimeError(f"two modules map to the kohya name {name}")
        try:
            module_tensors = _module_tensors(layer, adapter_name)
        except RuntimeError as e:
            raise RuntimeError(f"{component}:{path} has {e}") from None
        for suffix, t in module_tensors.items():
            tensors[f"{name}.{suffix}"] = t if suffix == "alpha" else t.detach().to("cpu", dtype).contiguous()
        written.append((component, path, layer, name))
    return tensors, written


def save_lora(path: str | Path, unet, text_encoders: list, *, family: str, metadata: dict[str, str],
              save_precision: str = "fp16", adapter_name: str = "default") -> SavedLora:
    """Write the trained adapter as one kohya-format .safetensors (docs/lora-format.md, 'Atomic write and self-check'), then prove it reloads onto these models."""

    path = Path(path)
    _check_family(family)
    if save_precision not in SAVE_DTYPES:
        raise UserError(f"output.save_precision: {save_precision!r} is not one of fp16, bf16, fp32",
                        field="output.save_precision")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad[:5]}")
    tensors, written = kohya_state_dict(unet, text_encoders, family=family, save_precision=save_precision,
                                        adapter_name=adapter_name)
    if not written:
        raise RuntimeError(f"no LoRA layers of adapter {adapter_name!r} found: nothing to save")

    # Serialise once; the hash covers only the bytes after the header, so adding it to the metadata
    # afterwards does not change it (docs/lora-format.md, 'Hashes').
    blob, digest, md = hashed_safetensors(tensors, metadata)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

    try:
        _verify_written(path, digest, md, written, unet, text_encoders, family, adapter_name, tensors,
                        save_precision)
    except Exception as e:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"self-check of {path} failed, file deleted: {e}") from e
    return SavedLora(path, digest, len(written), len(tensors))


def _verify_written(path, digest, md, written, unet, text_encoders, family, adapter_name, tensors, precision="fp32"):
    """Re-open the file and check hash, metadata, key resolution and alpha/r against the live adapter."""
    from safetensors import safe_open

    on_disk = lora_addnet_hash(path)
    if on_disk != digest:
        raise RuntimeError(f"hash of the written tensor data {on_disk} != stored {digest}")
    with safe_open(str(path), "pt") as f:
        if f.metadata() != md:
            raise RuntimeError("metadata read back differs from what was written")
        if set(f.keys()) != set(tensors):
            raise RuntimeError("tensor keys read back differ from what was written")
    lf = read_lora(path)
    if len(lf.modules) != len(written):
        raise RuntimeError(f"{len(lf.modules)} modules read back, {len(written)} written")
    matched = match_modules(lf, unet, text_encoders, family=family)
    for component, live_path, layer, name in written:
        canon = live_path if component == "unet" else te_canonical_path(live_path)
        key = f"{component}:{canon}"
        mod = lf.modules.get(key)
        if mod is None:
            raise RuntimeError(f"{name} did not read back as {key}")
        if matched.get(key) is not layer.get_base_layer():
            raise RuntimeError(f"{name} resolves to a different layer than {component}:{live_path}")
        if mod.is_plain:  # LoRA / LoCon: the very tensors and alpha/r
            trained = float(layer.scaling[adapter_name])
            if not math.isclose(mod.scale, trained, rel_tol=1e-6, abs_tol=1e-12):
                raise RuntimeError(f"{name}: alpha/r = {mod.scale} but the trained scaling is {trained}")
            if not (torch.equal(mod.down, tensors[name + ".lora_down.weight"].float())
                    and torch.equal(mod.up, tensors[name + ".lora_up.weight"].float())):
                raise RuntimeError(f"{name}: weights read back differ")
            continue
        # LoHa / LoKr / DoRA: the update rebuilt from the file alone equals the trained layer's
        base = layer.get_base_layer().weight.detach()
        with torch.no_grad():
            got = mod.delta(1.0, base.shape, base_weight=base)
            want = trained_delta(layer, adapter_name)
        err = float((got - want).norm() / want.norm().clamp_min(1e-12))
        if err > _DELTA_TOLERANCE[precision] and float((got - want).abs().max()) > 1e-7:
            raise RuntimeError(f"{name}: the update read back differs from the trained one by {err:.2e} "
                               f"(relative), more than {precision} rounding")


#: largest relative Frobenius error of a LoHa/LoKr/DoRA update read back, per save precision
_DELTA_TOLERANCE = {"fp16": 5e-3, "bf16": 4e-2, "fp32": 1e-5, "float": 1e-5}


def trained_delta(layer, adapter_name: str) -> torch.Tensor:
    """W' - W of one trained peft layer (LoRA, DoRA, LoHa or LoKr) in the base weight's shape, fp32."""
    from peft.tuners.lora import LoraLayer

    from trainer.lora.dora import dora_delta
    base = layer.get_base_layer().weight
    if isinstance(layer, LoraLayer):
        mag = getattr(layer, "lora_magnitude_vector", None)
        if mag is not None and adapter_name in mag:
            return dora_delta(layer, adapter_name)
        a, b = layer.lora_A[adapter_name].weight.float(), layer.lora_B[adapter_name].weight.float()
        return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(base.shape) * layer.scaling[adapter_name]
    was = layer.training
    layer.train(False)  # no rank dropout
    try:
        return layer.get_delta_weight(adapter_name).float().reshape(base.shape)
    finally:
        layer.train(was)


def save_diffusers_lora(out_dir: str | Path, unet, text_encoders: list, *, family: str,
                        save_precision: str = "fp16", adapter_name: str = "default") -> Path:
    """Optional second artifact: diffusers' pytorch_lora_weights.safetensors with PEFT keys and configs (docs/lora-format.md, 'The diffusers/PEFT file').

    Only diffusers reads it correctly (A1111/ComfyUI need the kohya file). TE keys use the fixed
    ``text_model.encoder...`` template so the file does not depend on the transformers version.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from trainer.lora.inject import iter_lora_layers

    _check_family(family)
    dtype = SAVE_DTYPES[save_precision]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def state(model, te: bool):
        sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
        out = {}
        for k, v in sd.items():
            if te:
                mod, _, role = k.rpartition(".lora_")
                canon = te_canonical_path(mod)
                if canon is None:
                    raise RuntimeError(f"unexpected text-encoder LoRA key {k}")
                k = f"{canon}.lora_{role}"
            out[k] = v.detach().to("cpu", dtype).contiguous()
        return out

    def config(model):
        cfg = getattr(model, "peft_config", {}).get(adapter_name)
        return cfg.to_dict() if cfg is not None else None

    kwargs = {}
    if any(True for _ in iter_lora_layers(unet, adapter_name)):
        kwargs["unet_lora_layers"] = state(unet, False)
        kwargs["unet_lora_adapter_metadata"] = config(unet)
    for i, te in enumerate(text_encoders):
        if te is not None and any(True for _ in iter_lora_layers(te, adapter_name)):
            kwargs[f"{TE_COMPONENTS[i]}_lora_layers"] = state(te, True)
            kwargs[f"{TE_COMPONENTS[i]}_lora_adapter_metadata"] = config(te)
    if not kwargs:
        raise RuntimeError(f"no LoRA layers of adapter {adapter_name!r} found: nothing to save")
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    tmp_name = f".pytorch_lora_weights.{os.getpid()}.tmp.safetensors"
    pipeline_cls.save_lora_weights(out_dir, weight_name=tmp_name, **kwargs)
    final = out_dir / "pytorch_lora_weights.safetensors"
    os.replace(out_dir / tmp_name, final)
    return final


