"""The one writer of the LoRA tools: internal-form modules -> a kohya-format .safetensors, checked before it gets
its name (docs/lora-format.md, 'LoRA tools')."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.common.names import FAMILIES
from trainer.errors import UserError
from trainer.lora.io import (ARCHITECTURES, IMPLEMENTATIONS, SAVE_DTYPES, LoraFile, LoraModule, kohya_module_name,
                             lora_addnet_hash, read_lora)
from trainer.lora.writer import hashed_safetensors
from trainer.lora.keymap import TE_COMPONENTS, UnetLayout, parse_unet_name
from trainer.lora.tools import PRECISIONS
#: largest relative Frobenius error of a delta read back, per dtype of the factors
_TOLERANCE = {"fp16": 5e-3, "bf16": 4e-2, "fp32": 1e-5}
#: SDXL's up blocks: attention in the first two (where the SGM name of an upsampler conv depends on it)
SDXL_LAYOUT = UnetLayout(2, (True, True, False))
#: metadata that describes the base model, copied from a source file to what a tool writes
BASE_KEYS = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_clip_skip", "ss_resolution",
             "modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type",
             "modelspec.resolution", "modelspec.encoder_layer")
#: the metadata key naming the tool that made a file (the bake tool writes it too)
TOOL_KEY = "lorastudio_tool"
#: the metadata key saying which LyCORIS (LoHa/LoKr) modules a tool rewrote as plain LoRA
CONVERTED_KEY = "lorastudio_converted"
#: metadata of a source that no longer describes a tool's output
_STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "lora_adapter_metadata",
               "ss_network_dim", "ss_network_alpha", "ss_network_args", "modelspec.date", "modelspec.title",
               TOOL_KEY, "lorastudio_sources", "lorastudio_args", CONVERTED_KEY)


@dataclass(frozen=True)
class Written:
    path: Path
    sha256: str           # addnet hash, stored as sshs_model_hash
    num_modules: int
    size_bytes: int
    ranks: dict[str, int]  # module key -> rank

    @property
    def size_text(self) -> str:
        """The file size as people read it: '136.6 KiB', '72.0 MiB'."""
        kib = self.size_bytes / 1024
        return f"{kib:.1f} KiB" if kib < 1024 else f"{kib / 1024:.1f} MiB"


@dataclass(frozen=True)
class ModuleReport:
    """One module of a tool's output: rank before and after, squared Frobenius norm of the delta it should
    carry and of the part it does."""
    key: str
    rank_in: int
    rank_out: int
    energy: float
    energy_kept: float

    @property
    def kept(self) -> float:
        """Retained Frobenius share ||ΔW_kept||_F / ||ΔW||_F (1.0 for a zero delta)."""
        return math.sqrt(self.energy_kept / self.energy) if self.energy > 0 else 1.0


@dataclass
class ToolResult:
    """What a tool wrote and how much of each module it kept; ``left_out``: modules not written (extract's
    threshold)."""
    written: Written
    modules: list[ModuleReport]
    left_out: list[str] = field(default_factory=list)
    #: modules read as LoHa/LoKr and written as plain LoRA (the SVD of their delta)
    converted: list[str] = field(default_factory=list)

    @property
    def kept(self) -> float:
        """The whole file's retained Frobenius share."""
        total = sum(m.energy for m in self.modules)
        return math.sqrt(sum(m.energy_kept for m in self.modules) / total) if total > 0 else 1.0


# ---------------------------------------------------------------------------------------------- naming

def family_of(lf: LoraFile) -> str | None:
    """'sd1' (SD1.x/SD2.x) or 'sdxl' for naming: the reader's answer, else the keys' dialect, else None."""
    if lf.family is not None:
        return lf.family
    if "text_encoder_2" in lf.components:
        return "sdxl"
    for mod in lf.modules.values():
        for key in mod.keys:
            if key.startswith("lora_unet_"):
                parsed = parse_unet_name(key[len("lora_unet_"):].split(".", 1)[0])
                if parsed is not None and parsed[0] == "sgm":
                    return "sdxl"
    if any(k.startswith("lora_te_") for mod in lf.modules.values() for k in mod.keys):
        return "sd1"
    return None


def check_output(out: str | Path, *, overwrite: bool) -> Path:
    """The output path, refused early (before any work) when it exists without ``overwrite`` or is no
    .safetensors name."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"{out}: the output must be a .safetensors file", path=str(out))
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file name for the output", path=str(out))
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; give --overwrite to replace it", path=str(out))
    return out


def base_metadata(family: str, prediction_type: str = "epsilon") -> dict[str, str]:
    """The base-model keys for a known family ('sd1', 'sd2', 'sdxl'), as trained LoRAs carry them."""
    v_pred = prediction_type in ("v", "v_prediction")
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    if v_pred and family != "sdxl":
        version += "_v"
    return {"ss_base_model_version": version, "ss_v2": str(family == "sd2"),
            "modelspec.architecture": ARCHITECTURES[(family, v_pred)],
            "modelspec.implementation": IMPLEMENTATIONS[family],
            "modelspec.prediction_type": "v" if v_pred else "epsilon"}


def source_record(lf: LoraFile, **extra) -> dict:
    """How a source file is named in ``lorastudio_sources``: file name, addnet hash, rank, plus ``extra``."""
    ranks = sorted({m.rank for m in lf.modules.values()})
    return {"file": lf.path.name, "sshs_model_hash": lf.addnet_hash, "rank": ranks[-1] if ranks else 0,
            "modules": len(lf.modules), "types": sorted({m.label for m in lf.modules.values()}), **extra}


def converted_note(labels: list[str]) -> str | None:
    """'12 LoHa modules written as plain LoRA (SVD of their delta)' for the LyCORIS modules a tool converted."""
    if not labels:
        return None
    counts = Counter(labels)
    parts = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
    return f"{parts} module{'s' if len(labels) > 1 else ''} written as plain LoRA (SVD of the delta)"


def tool_metadata(tool: str, modules: dict[str, LoraModule], *, sources: list[dict], args: dict,
                  inherited: dict[str, str] | None = None, title: str = "", family: str | None = None,
                  converted: str | None = None) -> dict[str, str]:
    """Metadata saying how a tool made a file (docs/lora-format.md, 'LoRA tools'): ``inherited`` keys first (the
    stale ones dropped), the base-model keys of an SDXL ``family`` where the sources had none (SD1 and SD2
    files cannot be told apart), then ``ss_network_*`` from the modules, ``modelspec`` basics and
    the ``lorastudio_*`` keys."""
    from trainer import __version__

    md = {k: v for k, v in (inherited or {}).items() if k not in _STALE_KEYS}
    if family == "sdxl":
        for k, v in base_metadata("sdxl").items():
            md.setdefault(k, v)
    def is_linear(m):
        return m.mid is None and (m.down.dim() == 2 or tuple(m.down.shape[2:]) == (1, 1))
    linear = [m for m in modules.values() if is_linear(m)]
    conv = [m for m in modules.values() if not is_linear(m)]

    def dim_alpha(mods):
        ranks = {m.rank for m in mods}
        alphas = {round(m.alpha, 6) for m in mods}
        dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
        alpha = str(float(alphas.pop())) if len(alphas) == 1 else "Dynamic"
        return dim, alpha

    dim, alpha = dim_alpha(linear or conv)
    md.update({"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha})
    net_args = {}
    if conv and linear:
        cdim, calpha = dim_alpha(conv)
        net_args = {"conv_dim": cdim, "conv_alpha": calpha}
    md["ss_network_args"] = json.dumps(net_args)
    md["ss_network_train_unet_only"] = str(all(k.startswith("unet:") for k in modules))
    md.setdefault("modelspec.sai_model_spec", "1.0.1")
    md["modelspec.implementation_version"] = f"lorastudio/{__version__}"
    md["modelspec.date"] = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    if title:
        md["modelspec.title"] = title
        md["ss_output_name"] = title
    md[TOOL_KEY] = tool
    md["lorastudio_sources"] = json.dumps(sources, ensure_ascii=False)
    md["lorastudio_args"] = json.dumps(args, ensure_ascii=False)
    md["lorastudio.version"] = __version__
    if converted:
        md[CONVERTED_KEY] = converted
    return md


# ---------------------------------------------------------------------------------------------- writing

def _tensors(modules: dict[str, LoraModule], family: str, layout: UnetLayout, dtype) -> dict[str, torch.Tensor]:
    n_te = 2 if family == "sdxl" else 1
    tensors: dict[str, torch.Tensor] = {}
    for key, mod in modules.items():
        component, _, path = key.partition(":")
        if component != "unet" and (component not in TE_COMPONENTS or TE_COMPONENTS.index(component) >= n_te):
            raise ValueError(f"{key}: no {component} in a {family} LoRA")
        if mod.up.shape[1] != mod.rank or mod.up.dim() != mod.down.dim():
            raise ValueError(f"{key}: down {tuple(mod.down.shape)} and up {tuple(mod.up.shape)} are no LoRA pair")
        name = kohya_module_name(component, path, family, layout)
        if name + ".alpha" in tensors:
            raise ValueError(f"two modules map to the kohya name {name}")
        tensors[name + ".lora_down.weight"] = mod.down.detach().to("cpu", dtype).contiguous()
        tensors[name + ".lora_up.weight"] = mod.up.detach().to("cpu", dtype).contiguous()
        if mod.mid is not None:
            tensors[name + ".lora_mid.weight"] = mod.mid.detach().to("cpu", dtype).contiguous()
        tensors[name + ".alpha"] = torch.tensor(float(mod.alpha), dtype=torch.float32)
    return tensors


def _frobenius_error(want: LoraModule, got: LoraModule) -> tuple[float, float]:
    """(||ΔW_got - ΔW_want||_F, ||ΔW_want||_F) from the factors, in float64, without forming either delta."""
    from trainer.lora.tools.svd import low_rank

    x, y = low_rank(want), low_rank(got)
    xa, xb, ya, yb = x.a.double(), x.b.double(), y.a.double(), y.b.double()

    def inner(a1, b1, a2, b2):  # <a1 b1, a2 b2>_F = tr((a1^T a2)(b2 b1^T))
        return float(((a1.T @ a2) * (b1 @ b2.T)).sum())

    ww, gg, wg = inner(xa, xb, xa, xb), inner(ya, yb, ya, yb), inner(xa, xb, ya, yb)
    return math.sqrt(max(ww + gg - 2 * wg, 0.0)), math.sqrt(max(ww, 0.0))


def _self_check(path: Path, digest: str, metadata: dict[str, str], modules: dict[str, LoraModule],
                family: str, precision: str) -> None:
    """Read the file back with the project's reader: hash, metadata, the same modules, each delta as meant."""
    from safetensors import safe_open

    on_disk = lora_addnet_hash(path)
    if on_disk != digest:
        raise RuntimeError(f"hash of the written tensor data {on_disk} != stored {digest}")
    with safe_open(str(path), "pt") as f:
        if f.metadata() != metadata:
            raise RuntimeError("metadata read back differs from what was written")
    lf = read_lora(path)
    if set(lf.modules) != set(modules):
        extra, lost = sorted(set(lf.modules) - set(modules)), sorted(set(modules) - set(lf.modules))
        raise RuntimeError(f"modules read back differ: lost {lost[:3]}, extra {extra[:3]}")
    want_class = "sdxl" if family == "sdxl" else "sd1"
    if lf.family not in (None, want_class):
        raise RuntimeError(f"the file reads back as a {lf.family} LoRA, not {want_class}")
    tol = _TOLERANCE[precision]
    for key, want in modules.items():
        err, norm = _frobenius_error(want, lf.modules[key])
        if err > tol * norm + 1e-12:
            raise RuntimeError(f"{key}: the delta read back is off by {err / max(norm, 1e-30):.2e} (relative)")


def write_lora(path: str | Path, modules: dict[str, LoraModule], *, family: str, metadata: dict[str, str],
               save_precision: str = "fp16", overwrite: bool = False, layout: UnetLayout | None = None) -> Written:
    """Write ``modules`` ("<component>:<path>" -> LoraModule) as one kohya-format file (docs/lora-format.md,
    'Tensors and shapes', 'Module names'), adding the hash keys to ``metadata``.

    The file is written under a temporary name in the target folder, read back and checked there
    (docs/lora-format.md, 'LoRA tools'), and only then renamed: the final name never holds a half-written or
    unchecked file. ``family`` is 'sd1', 'sd2' or 'sdxl' (key dialect and TE prefixes); ``layout`` is the UNet's
    when known (SDXL upsampler names), else SDXL's real one.
    """

    path = Path(path)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if save_precision not in PRECISIONS:
        raise UserError(f"--precision: {save_precision!r} is not one of {', '.join(PRECISIONS)}")
    if not modules:
        raise UserError(f"{path.name}: no modules left to write")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; give --overwrite to replace it", path=str(path))
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad[:5]}")
    layout = layout or (SDXL_LAYOUT if family == "sdxl" else UnetLayout())
    tensors = _tensors(modules, family, layout, SAVE_DTYPES[save_precision])
    blob, digest, md = hashed_safetensors(tensors, metadata)
    del tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        try:
            _self_check(tmp, digest, md, modules, family, save_precision)
        except Exception as e:
            raise RuntimeError(f"self-check of {path.name} failed, nothing written: {e}") from e
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return Written(path, digest, len(modules), len(blob), {k: m.rank for k, m in modules.items()})
