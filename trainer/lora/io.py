"""Write LoRA files in kohya format and read every common SD LoRA layout into one internal form (docs/lora-format.md)."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.common.names import FAMILIES
from trainer.common.safetensors_header import header_length
from trainer.errors import UserError
from trainer.lora.keymap import (TE_COMPONENTS, UnetLayout, is_diffusers_unet_path, kohya_te_name, kohya_unet_name,
                     parse_ldm_path, parse_te_name, parse_unet_name, te_canonical_path)

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float": torch.float32}

ARCHITECTURES = {  # (family, v-prediction) -> modelspec.architecture
    ("sd1", False): "stable-diffusion-v1/lora", ("sd1", True): "stable-diffusion-v1/lora",
    ("sd2", False): "stable-diffusion-v2-512/lora", ("sd2", True): "stable-diffusion-v2-768-v/lora",
    ("sdxl", False): "stable-diffusion-xl-v1-base/lora", ("sdxl", True): "stable-diffusion-xl-v1-base/lora",
}
IMPLEMENTATIONS = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
FAMILY_LABELS = {"sd1": "SD1.x/SD2.x", "sdxl": "SDXL"}

_OPTIMIZER_NAMES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                    "prodigy": "prodigyopt.Prodigy", "lion": "lion_pytorch.Lion",
                    "adafactor": "transformers.optimization.Adafactor"}


# ============================================================================================== internal form

@dataclass
class LoraModule:
    """One LoRA module normalised to fp32 factors; ``rank`` always comes from the tensors (docs/lora-format.md, 'Alpha and scale')."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    mid: torch.Tensor | None = None
    keys: tuple[str, ...] = ()
    format: str = ""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, multiplier: float = 1.0, shape: torch.Size | tuple | None = None) -> torch.Tensor:
        """ΔW to add to the base weight at strength ``multiplier``: multiplier * alpha/rank * (up ∘ down), fp32.

        Convs use the conv composition (up [out,r,1,1] after down [r,in,kh,kw]); a LyCORIS Tucker core
        (``lora_mid``, [r,r,kh,kw]) sits between them. ``shape`` reshapes the result (e.g. a 1x1-conv LoRA
        for a Linear layer).
        """
        up = self.up.float().reshape(self.up.shape[0], -1)
        down = self.down.float().reshape(self.rank, -1)
        if self.mid is not None:
            w = torch.einsum("nmkl,in,mj->ijkl", self.mid.float(), up, down)
        elif self.down.dim() == 4:
            w = (up @ down).reshape(up.shape[0], *self.down.shape[1:])
        else:
            w = up @ down
        w = w * (multiplier * self.scale)
        return w.reshape(shape) if shape is not None else w


@dataclass
class LoraFile:
    """A LoRA file read into the internal form; ``family`` is 'sd1' (SD1.x/SD2.x), 'sdxl' or None (unknown)."""
    path: Path
    formats: dict[str, int]
    family: str | None
    metadata: dict[str, str]
    #: "<component>:<module path>" -> module; diffusers UNet paths, ``text_model.encoder...`` TE paths
    modules: dict[str, LoraModule]
    #: keys that were not understood and left out (only with allow_partial)
    skipped: list[str] = field(default_factory=list)
    _addnet_hash: str | None = None

    @property
    def addnet_hash(self) -> str:
        if self._addnet_hash is None:
            self._addnet_hash = lora_addnet_hash(self.path)
        return self._addnet_hash

    @property
    def components(self) -> set[str]:
        return {k.split(":", 1)[0] for k in self.modules}


@dataclass(frozen=True)
class SavedLora:
    path: Path
    sha256: str  # of the tensor data after the header: the addnet hash stored as sshs_model_hash
    num_modules: int
    num_tensors: int


# ================================================================================================== hashing

def lora_addnet_hash(path: str | Path) -> str:
    """The "addnet" hash (= Civitai AutoV3, ``sshs_model_hash``): SHA-256 of everything after the header (docs/lora-format.md, 'Hashes')."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = header_length(head) if len(head) == 8 else -1
            # a bogus length would hash an empty tail: the "hash of nothing" bug (docs/lora-format.md, 'Hashes',
            # ai-toolkit #130)
            if n < 2 or 8 + n > os.fstat(f.fileno()).st_size:
                raise UserError(f"{path}: not a safetensors file (bad header length)", path=str(path))
            f.seek(8 + n)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise UserError(f"LoRA file not found: {path}", path=str(path)) from None
    return h.hexdigest()


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


def kohya_module_name(component: str, path: str, family: str, layout: UnetLayout) -> str:
    if component == "unet":
        return kohya_unet_name(path, family, layout)
    index = TE_COMPONENTS.index(component)
    return kohya_te_name(path, index, 2 if family == "sdxl" else 1)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl', got {family!r}")


def kohya_state_dict(unet, text_encoders: list, *, family: str, save_precision: str = "fp16",
                     adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], list]:
    """The tensors of the kohya file (docs/lora-format.md, 'Tensors and shapes') and the (component, path, layer, name) list they came from."""
    _check_family(family)
    dtype = SAVE_DTYPES[save_precision]
    layout = UnetLayout.from_unet(unet)
    tensors: dict[str, torch.Tensor] = {}
    written = []
    for component, path, layer in _adapter_layers(unet, text_encoders, adapter_name):
        if layer.use_dora.get(adapter_name, False):
            raise RuntimeError(f"{component}:{path} uses DoRA, which the kohya format cannot carry "
                               "(docs/lora-format.md, 'DoRA and LyCORIS')")
        if layer.lora_bias.get(adapter_name, False):
            raise RuntimeError(f"{component}:{path} has a LoRA bias, which the kohya format cannot carry")
        name = kohya_module_name(component, path, family, layout)
        if name + ".alpha" in tensors:
            raise RuntimeError(f"two modules map to the kohya name {name}")
        down = layer.lora_A[adapter_name].weight.detach()
        up = layer.lora_B[adapter_name].weight.detach()
        tensors[name + ".lora_down.weight"] = down.to("cpu", dtype).contiguous()
        tensors[name + ".lora_up.weight"] = up.to("cpu", dtype).contiguous()
        tensors[name + ".alpha"] = torch.tensor(_file_alpha(layer, adapter_name), dtype=torch.float32)
        written.append((component, path, layer, name))
    return tensors, written


def save_lora(path: str | Path, unet, text_encoders: list, *, family: str, metadata: dict[str, str],
              save_precision: str = "fp16", adapter_name: str = "default") -> SavedLora:
    """Write the trained adapter as one kohya-format .safetensors (docs/lora-format.md, 'Atomic write and self-check'), then prove it reloads onto these models."""
    from safetensors.torch import save as st_save

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
    blob = st_save(tensors)
    digest = hashlib.sha256(memoryview(blob)[8 + header_length(blob):]).hexdigest()
    md = dict(metadata)
    md["sshs_model_hash"] = digest
    md["modelspec.hash_sha256"] = "0x" + digest
    blob = _with_metadata(blob, md)

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
        _verify_written(path, digest, md, written, unet, text_encoders, family, adapter_name, tensors)
    except Exception as e:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"self-check of {path} failed, file deleted: {e}") from e
    return SavedLora(path, digest, len(written), len(tensors))


def _verify_written(path, digest, md, written, unet, text_encoders, family, adapter_name, tensors):
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
        trained = float(layer.scaling[adapter_name])
        if not math.isclose(mod.scale, trained, rel_tol=1e-6, abs_tol=1e-12):
            raise RuntimeError(f"{name}: alpha/r = {mod.scale} but the trained scaling is {trained}")
        if not (torch.equal(mod.down, tensors[name + ".lora_down.weight"].float())
                and torch.equal(mod.up, tensors[name + ".lora_up.weight"].float())):
            raise RuntimeError(f"{name}: weights read back differ")


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


# ================================================================================================= metadata

def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _bucket_info(info: dict) -> dict:
    """Normalise to kohya's {"buckets": {"<i>": {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}."""
    buckets = info.get("buckets", {}) if isinstance(info, dict) else {}
    if isinstance(buckets, list):
        buckets = dict(enumerate(buckets))
    out = {str(k): {"resolution": [int(x) for x in b["resolution"]], "count": int(b["count"])}
           for k, b in buckets.items()}
    return {"buckets": out, "mean_img_ar_error": float(info.get("mean_img_ar_error", 0.0))}


def build_metadata(cfg, *, family: str, prediction_type: str, base_model_name: str, steps: int, epoch: int,
                   started_at: float, finished_at: float, session_id: int, num_train_images: int,
                   tag_frequency: dict, dataset_dirs: dict, bucket_info: dict,
                   resolved_config_toml: str, num_reg_images: int = 0,
                   reg_dataset_dirs: dict | None = None) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` keys of docs/lora-format.md, 'Metadata' plus our ``lorastudio.*`` keys.

    The hash keys are added by save_lora.
    """
    from trainer import __version__

    _check_family(family)
    v_pred = prediction_type in ("v_prediction", "v")
    lora, train, data, out = cfg.lora, cfg.train, cfg.data, cfg.output
    te_trained = bool(lora.train_text_encoder)
    te_lr = train.text_encoder_lr if train.text_encoder_lr >= 0 else train.learning_rate
    network_args = {}
    if lora.conv_rank > 0:
        network_args = {"conv_dim": str(lora.conv_rank), "conv_alpha": str(float(lora.conv_alpha))}
    batches_per_epoch = max(1, math.ceil(math.ceil(max(1, num_train_images) / train.batch_size)
                                         / train.gradient_accumulation_steps))
    base_version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    if v_pred and family != "sdxl":
        base_version += "_v"
    res = int(data.resolution)
    md = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(float(lora.alpha)),
        "ss_network_args": _json(network_args),
        "ss_network_dropout": str(float(lora.dropout)),
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": base_version,
        "ss_output_name": out.name,
        "ss_training_started_at": str(float(started_at)),
        # intermediate saves pass finished_at=0: the run has not finished
        "ss_training_finished_at": str(float(finished_at)) if finished_at else "None",
        "ss_session_id": str(int(session_id)),
        "ss_epoch": str(int(epoch)),
        "ss_steps": str(int(steps)),
        "ss_max_train_steps": str(train.max_steps),
        "ss_num_epochs": str(math.ceil(train.max_steps / batches_per_epoch)),
        "ss_sd_model_name": base_model_name,
        "ss_clip_skip": str(cfg.model.clip_skip),
        "ss_resolution": f"({res}, {res})",
        "ss_learning_rate": str(train.learning_rate),
        "ss_unet_lr": str(train.learning_rate),
        "ss_text_encoder_lr": str(te_lr) if te_trained else "None",
        "ss_network_train_unet_only": str(not te_trained),
        "ss_optimizer": f"{_OPTIMIZER_NAMES.get(train.optimizer, train.optimizer)}(weight_decay={train.weight_decay})",
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.lr_warmup_steps),
        "ss_seed": str(train.seed),
        "ss_mixed_precision": train.mixed_precision,
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_max_grad_norm": str(train.max_grad_norm),
        "ss_num_train_images": str(int(num_train_images)),
        "ss_num_reg_images": str(int(num_reg_images)),
        "ss_noise_offset": str(float(train.noise_offset)),
        "ss_min_snr_gamma": str(float(train.min_snr_gamma)),
        "ss_caption_dropout_rate": str(float(data.caption_dropout)),
        "ss_shuffle_caption": str(data.shuffle_caption),
        "ss_keep_tokens": str(data.keep_tokens),
        "ss_enable_bucket": str(data.enable_bucket),
        "ss_min_bucket_reso": str(data.min_bucket_px),
        "ss_max_bucket_reso": str(data.max_bucket_px),
        "ss_bucket_no_upscale": str(data.bucket_no_upscale),
        "ss_cache_latents": str(data.cache_latents),
        "ss_flip_aug": str(data.flip),
        "ss_prior_loss_weight": str(float(data.prior_loss_weight)),
        "ss_bucket_info": _json(_bucket_info(bucket_info or {})),
    }
    if out.dataset_metadata:
        # captions and folder names can be private: only embedded when the user leaves this on
        md["ss_tag_frequency"] = _json({str(d): {str(t): int(c) for t, c in tags.items()}
                                        for d, tags in (tag_frequency or {}).items()})
        md["ss_dataset_dirs"] = _json({str(d): {"n_repeats": int(v["n_repeats"]), "img_count": int(v["img_count"])}
                                       for d, v in (dataset_dirs or {}).items()})
        md["ss_reg_dataset_dirs"] = _json({str(d): {"n_repeats": int(v["n_repeats"]), "img_count": int(v["img_count"])}
                                           for d, v in (reg_dataset_dirs or {}).items()})
    md.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURES[(family, v_pred)],
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.implementation_version": f"lorastudio/{__version__}",
        "modelspec.title": out.name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.datetime.fromtimestamp(finished_at or time.time()).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.encoder_layer": str(cfg.model.clip_skip),
    })
    for key, value in (("author", out.author), ("description", out.description),
                       ("trigger_phrase", out.trigger_phrase)):
        if value:
            md[f"modelspec.{key}"] = value
    md["lorastudio.config"] = resolved_config_toml
    md["lorastudio.version"] = __version__
    return md


# ================================================================================================== reading

_KOHYA_KEY_RE = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te|lycoris)_([^.]+)\.(.+)$")
_KOHYA_PREFIX_COMPONENT = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid",
                "scale": "scale", "lora_A.weight": "down", "lora_B.weight": "up"}
# (suffix, role, format) for dotted keys, checked in this order
_DOTTED_SUFFIXES = (
    (".lora_A.weight", "down", "peft"), (".lora_B.weight", "up", "peft"),
    (".lora_linear_layer.down.weight", "down", "diffusers_old"),
    (".lora_linear_layer.up.weight", "up", "diffusers_old"),
    (".lora.down.weight", "down", "diffusers_old"), (".lora.up.weight", "up", "diffusers_old"),
    ("_lora.down.weight", "down", "diffusers_old"), ("_lora.up.weight", "up", "diffusers_old"),
    (".lora_down.weight", "down", None), (".lora_up.weight", "up", None), (".lora_mid.weight", "mid", None),
    (".alpha", "alpha", None),
)
# tensors of adapter kinds this reader does not turn into LoRA factors
_UNSUPPORTED = (
    (re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), "LoHa (LyCORIS hada_*)"),
    (re.compile(r"\.lokr_(w[12](_[ab])?|t2)$"), "LoKr (LyCORIS lokr_*)"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)$"), "DoRA"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R\.weight|rescale)$"), "OFT/BOFT"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.(on_input)$"), "IA3"),
    (re.compile(r"\.(diff|diff_b|w_norm|b_norm)$"), "full/norm difference"),
    (re.compile(r"\.lora_B\.bias$"), "LoRA bias"),
)
_TE_OLD_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_COMFY_CLIP = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}


def _normalise_dotted(component: str | None, path: str) -> tuple[str, str] | None:
    """(component or None, dotted module path) of a PEFT/diffusers key -> (component, canonical path)."""
    path = path.replace(".processor.", ".")  # 2023 attention-processor spelling
    if component in (None, "unet"):
        p = path + ".0" if path.endswith(".to_out") else path
        if is_diffusers_unet_path(p):
            return "unet", p
        if component == "unet":
            return None
    m = re.match(r"^(.*\.self_attn)\.(to_q|to_k|to_v|to_out)$", path)
    if m:  # 2023 diffusers TE spelling
        path = f"{m[1]}.{_TE_OLD_ATTN[m[2]]}"
    canon = te_canonical_path(path)
    if canon is None:
        return None
    return (component or "text_encoder"), canon


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """A tensor key -> (format, component, canonical module path, role), or None if not understood."""
    m = _KOHYA_KEY_RE.match(key)
    if m:
        prefix, name, role_key = m[1], m[2], m[3]
        role = _KOHYA_ROLES.get(role_key)
        if role is None:
            return None
        if prefix in ("lora_unet", "lycoris"):
            parsed = parse_unet_name(name)
            if parsed is None:
                return None
            return ("kohya" if prefix == "lora_unet" else "lycoris"), "unet", parsed[1], role
        canon = parse_te_name(name)
        if canon is None:
            return None
        return "kohya", _KOHYA_PREFIX_COMPONENT[prefix], canon, role

    for suffix, role, fmt in _DOTTED_SUFFIXES:
        if key.endswith(suffix):
            stem = key[:-len(suffix)]
            break
    else:
        return None
    if stem.startswith("base_model.model."):
        stem = stem[len("base_model.model."):]
    if stem.startswith("diffusion_model."):  # ComfyUI generic: LDM path
        d = parse_ldm_path(stem[len("diffusion_model."):])
        return ("comfyui", "unet", d, role) if d else None
    m = re.match(r"^text_encoders\.(clip_[lgh])\.transformer\.(.+)$", stem)
    if m:
        canon = te_canonical_path(m[2])
        return ("comfyui", _COMFY_CLIP[m[1]], canon, role) if canon else None
    component = None
    for comp in ("unet", "text_encoder_2", "text_encoder"):
        if stem.startswith(comp + "."):
            component, stem = comp, stem[len(comp) + 1:]
            break
    norm = _normalise_dotted(component, stem)
    if norm is None:
        return None
    return (fmt or "peft"), norm[0], norm[1], role


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            if name == key or name.endswith("." + key):
                return value
    return default


def _adapter_metadata(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"{path}: lora_adapter_metadata is not valid JSON", path=str(path)) from None
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, field_name = k.partition(".")
        out.setdefault(comp, {})[field_name] = v
    return out


def _few(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _open_safetensors(path: Path):
    from safetensors import safe_open
    if not path.exists():
        raise UserError(f"LoRA file not found: {path}", path=str(path))
    if not path.is_file():
        raise UserError(f"{path} is not a file", path=str(path))
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise UserError(f"{path}: only .safetensors LoRA files are read (pickle-based files can run code); "
                        f"convert it to .safetensors first", path=str(path))
    try:
        return safe_open(str(path), "pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError, bad JSON
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid .safetensors file ({why}); the file may be truncated or not a LoRA",
                        path=str(path)) from None


def read_lora(path: str | Path, *, allow_partial: bool = False) -> LoraFile:
    """Read a kohya/LyCORIS-LoCon, PEFT/diffusers or ComfyUI-generic LoRA into the internal form (docs/lora-format.md, 'What we read')."""
    path = Path(path)
    raw: dict[tuple[str, str], dict[str, tuple[str, str, torch.Tensor]]] = {}
    unknown: list[str] = []
    unsupported: dict[str, list[str]] = {}
    with _open_safetensors(path) as f:
        metadata = dict(f.metadata() or {})
        keys = list(f.keys())
        for key in keys:
            kind = next((label for rx, label in _UNSUPPORTED if rx.search(key)), None)
            if kind is not None:
                unsupported.setdefault(kind, []).append(key)
                continue
            parsed = _parse_key(key)
            if parsed is None:
                unknown.append(key)
                continue
            fmt, component, mpath, role = parsed
            slot = raw.setdefault((component, mpath), {})
            if role in slot:
                raise UserError(f"{path}: {key} and {slot[role][1]} are the same tensor of "
                                f"{component}:{mpath}; the file mixes two spellings of one module", path=str(path))
            try:
                tensor = f.get_tensor(key)
            except Exception as e:
                raise UserError(f"{path}: tensor {key} cannot be read ({e}); the file is corrupt",
                                path=str(path)) from None
            slot[role] = (fmt, key, tensor)
    if not keys:
        raise UserError(f"{path} contains no tensors; it is not a LoRA", path=str(path))

    if unsupported and not allow_partial:
        kind, ks = next(iter(unsupported.items()))
        raise UserError(f"{path}: {kind} tensors are not supported (only LoRA/LoCon factors are), e.g. {_few(ks, 3)}; "
                        f"use a plain LoRA file", path=str(path))

    adapter_md = _adapter_metadata(metadata, path)
    modules: dict[str, LoraModule] = {}
    incomplete: list[str] = []
    formats: dict[str, int] = {}
    for (component, mpath), slot in raw.items():
        if "down" not in slot or "up" not in slot:
            incomplete.extend(k for _, k, _ in slot.values())
            continue
        fmt, down_key, down = slot["down"]
        _, up_key, up = slot["up"]
        rank = int(down.shape[0])
        mid = slot["mid"][2].float() if "mid" in slot else None
        if up.shape[1] != rank or down.dim() not in (2, 4) or up.dim() != down.dim() or (
                mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
            raise UserError(f"{path}: {down_key} {tuple(down.shape)} and {up_key} {tuple(up.shape)} "
                            f"do not form a LoRA pair", path=str(path))
        if "alpha" in slot:
            alpha = float(slot["alpha"][2].float().item())
        elif "scale" in slot:  # A1111 honours an explicit scale tensor over alpha/r
            alpha = float(slot["scale"][2].float().item()) * rank
        elif component in adapter_md:
            cfg = adapter_md[component]
            live_name = down_key.rsplit(".lora_", 1)[0].removeprefix(component + ".")
            a = float(_pattern_value(cfg.get("alpha_pattern"), live_name, cfg.get("lora_alpha", rank)))
            # so alpha/r = alpha/sqrt(r) (docs/lora-format.md, 'Alpha and scale')
            alpha = a * math.sqrt(rank) if cfg.get("use_rslora") else a
        else:
            # what kohya and diffusers assume when alpha is absent (docs/lora-format.md, 'Alpha and scale')
            alpha = float(rank)
        if alpha == 0.0 and fmt == "kohya":
            alpha = float(rank)  # kohya trains alpha 0 as alpha = r
        keys_used = tuple(k for _, k, _ in slot.values())
        modules[f"{component}:{mpath}"] = LoraModule(down.float(), up.float(), alpha, mid, keys_used, fmt)
        formats[fmt] = formats.get(fmt, 0) + 1

    problems = unknown + incomplete
    if problems and not allow_partial:
        what = "unknown keys" if unknown else "LoRA halves without their partner"
        raise UserError(f"{path}: {len(problems)} {what} that this reader cannot map to a model layer: "
                        f"{_few(problems)}", path=str(path))
    if not modules:
        raise UserError(f"{path}: no LoRA modules found (keys such as {_few(keys, 3)})", path=str(path))
    skipped = problems + [k for ks in unsupported.values() for k in ks]
    if skipped:
        log.warning("%s: %d keys skipped (partial load allowed): %s", path.name, len(skipped), _few(skipped))
    family = _structure_family(modules) or _metadata_family(metadata)
    return LoraFile(path, formats, family, metadata, modules, skipped)


def _structure_family(modules: dict[str, LoraModule]) -> str | None:
    """'sd1' (SD1.x/SD2.x) or 'sdxl' from the UNet block structure and the set of text encoders."""
    sdxl = sd1 = False
    for k in modules:
        comp, _, p = k.partition(":")
        if comp == "text_encoder_2":
            sdxl = True
        # SDXL: attention in up block 0, deep transformers; SD1: attention in down block 0, four levels
        if re.match(r"^up_blocks\.0\.attentions\.|^.*\.transformer_blocks\.[1-9]", p):
            sdxl = True
        if re.match(r"^down_blocks\.0\.attentions\.|^up_blocks\.3\.|^down_blocks\.3\.", p):
            sd1 = True
    return None if sdxl == sd1 else ("sdxl" if sdxl else "sd1")


def _metadata_family(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith(("sd_v1", "sd_v2")) or arch.startswith(("stable-diffusion-v1", "stable-diffusion-v2")):
        return "sd1"
    return None


# ================================================================================================= matching

def _family_class(family: str) -> str:
    return "sdxl" if family == "sdxl" else "sd1"


def _lookup(root, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _base_layer(module):
    # a model that already carries PEFT adapters wraps the original layer
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _fits(mod: LoraModule, layer) -> bool:
    w = getattr(layer, "weight", None)
    if w is None or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        return False
    out_features, in_total = w.shape[0], int(w[0].numel())
    if mod.up.shape[0] != out_features:
        return False
    if isinstance(layer, torch.nn.Conv2d):
        if mod.down.dim() == 2:  # Linear-shaped factors for a 1x1 conv (SD2/SDXL-style proj_in on SD1)
            return tuple(w.shape[2:]) == (1, 1) and mod.down.shape[1] == w.shape[1]
        if mod.down.shape[1] != w.shape[1]:
            return False
        kernel = tuple(mod.mid.shape[2:]) if mod.mid is not None else tuple(mod.down.shape[2:])
        return kernel == tuple(w.shape[2:])
    return int(mod.down[0].numel()) == in_total and mod.mid is None


def match_modules(lora_file: LoraFile, unet, text_encoders: list, *, family: str,
                  allow_partial: bool = False) -> dict[str, torch.nn.Module]:
    """Map every module of a read LoRA to the live base layer (nn.Linear / nn.Conv2d) it patches."""
    name = lora_file.path.name
    want = _family_class(family)
    if lora_file.family is not None and lora_file.family != want:
        raise UserError(f"{name} is a LoRA for {FAMILY_LABELS[lora_file.family]} models, but the loaded base "
                        f"model is {FAMILY_LABELS[want]}; pick a {FAMILY_LABELS[lora_file.family]} base model "
                        f"or another LoRA", path=str(lora_file.path))
    claimed = _metadata_family(lora_file.metadata)
    if claimed is not None and claimed != want:
        # the tensors fit (checked below) but the file says otherwise: tell the user, do not refuse
        # (docs/lora-format.md, 'What we read')
        log.warning("%s: its metadata says it is for %s models, but its layers fit the loaded %s model",
                    name, FAMILY_LABELS[claimed], FAMILY_LABELS[want])
    roots = {"unet": unet}
    for i, te in enumerate(text_encoders or []):
        roots[TE_COMPONENTS[i]] = te
    matched: dict[str, torch.nn.Module] = {}
    missing: list[str] = []
    misfit: list[str] = []
    for key, mod in lora_file.modules.items():
        component, _, mpath = key.partition(":")
        root = roots.get(component)
        layer = None
        if root is not None:
            layer = _lookup(root, mpath)
            if layer is None and mpath.startswith("text_model."):  # transformers 5 CLIPTextModel
                layer = _lookup(root, mpath[len("text_model."):])
        if layer is None:
            missing.append(key)
            continue
        layer = _base_layer(layer)
        if not _fits(mod, layer):
            w = getattr(layer, "weight", None)
            misfit.append(f"{key} (LoRA down {tuple(mod.down.shape)} up {tuple(mod.up.shape)} vs layer "
                          f"{tuple(w.shape) if w is not None else type(layer).__name__})")
            continue
        matched[key] = layer
    if misfit and not allow_partial:
        raise UserError(f"{name}: {len(misfit)} LoRA modules do not fit the loaded model's layers, so the LoRA was "
                        f"made for a different base model (e.g. {_few(misfit, 2)})", path=str(lora_file.path))
    if missing and not allow_partial:
        raise UserError(f"{name}: {len(missing)} LoRA modules have no matching layer in the loaded model: "
                        f"{_few(missing)}", path=str(lora_file.path))
    return matched
