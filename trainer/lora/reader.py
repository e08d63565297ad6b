"""Read every common SD LoRA layout (kohya, LyCORIS LoCon, PEFT/diffusers, ComfyUI) into the internal form (docs/lora-format.md, 'What we read')."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.lora.form import LoraFile, LoraModule, _few
from trainer.lora.kinds import KIND_LABELS
from trainer.lora.keymap import is_diffusers_unet_path, parse_ldm_path, parse_te_name, parse_unet_name, te_canonical_path

log = logging.getLogger(__name__)

_KOHYA_KEY_RE = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te|lycoris)_([^.]+)\.(.+)$")
_KOHYA_PREFIX_COMPONENT = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid",
                "scale": "scale", "lora_A.weight": "down", "lora_B.weight": "up", "dora_scale": "dora_scale"}
# LyCORIS LoHa/LoKr tensors keep their file names as roles (docs/lora-format.md, 'DoRA and LyCORIS')
_LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_KOHYA_ROLES.update({r: r for r in _LOHA_ROLES + _LOKR_ROLES})
_KIND_ROLES = {"lora": ("down", "up", "mid"), "loha": _LOHA_ROLES, "lokr": _LOKR_ROLES}
# (suffix, role, format) for dotted keys, checked in this order
_DOTTED_SUFFIXES = (
    (".lora_A.weight", "down", "peft"), (".lora_B.weight", "up", "peft"),
    (".lora_linear_layer.down.weight", "down", "diffusers_old"),
    (".lora_linear_layer.up.weight", "up", "diffusers_old"),
    (".lora.down.weight", "down", "diffusers_old"), (".lora.up.weight", "up", "diffusers_old"),
    ("_lora.down.weight", "down", "diffusers_old"), ("_lora.up.weight", "up", "diffusers_old"),
    (".lora_down.weight", "down", None), (".lora_up.weight", "up", None), (".lora_mid.weight", "mid", None),
    (".alpha", "alpha", None),
    (".lora_magnitude_vector.weight", "dora_scale", "peft"), (".lora_magnitude_vector", "dora_scale", "peft"),
)
# tensors of adapter types this reader cannot apply (docs/lora-format.md, 'DoRA and LyCORIS')
_UNSUPPORTED = (
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
        raise UserError(f"{path}: {kind} adapters cannot be applied (LoRA, LoCon, LoHa, LoKr and DoRA can), "
                        f"e.g. {_few(ks, 3)}", path=str(path))

    adapter_md = _adapter_metadata(metadata, path)
    modules: dict[str, LoraModule] = {}
    incomplete: list[str] = []
    broken: list[str] = []  # "<module>: what is wrong" of LoHa/LoKr/DoRA modules and mixed ones
    broken_keys: list[str] = []
    formats: dict[str, int] = {}
    for (component, mpath), slot in raw.items():
        kinds = [k for k, roles in _KIND_ROLES.items() if any(r in slot for r in roles)]
        where = f"{component}:{mpath}"
        keys_used = tuple(k for _, k, _ in slot.values())

        def fail(msg: str, keys=keys_used) -> None:
            broken.append(msg)
            broken_keys.extend(keys)

        if len(kinds) > 1:
            fail(f"{where} mixes {' and '.join(KIND_LABELS[k] for k in kinds)} tensors "
                 f"({_few(sorted(k for _, k, _ in slot.values()), 4)})")
            continue
        kind = kinds[0] if kinds else "lora"
        fmt = next(iter(slot.values()))[0]
        if kind == "lora":
            if "down" not in slot or "up" not in slot:
                if "dora_scale" in slot and ("down" in slot or "up" in slot):
                    fail(f"{where}: a DoRA module without its {'lora_up' if 'down' in slot else 'lora_down'}")
                else:
                    incomplete.extend(keys_used)
                continue
            fmt, down_key, down = slot["down"]
            _, up_key, up = slot["up"]
            rank = int(down.shape[0])
            mid = slot["mid"][2].float() if "mid" in slot else None
            if up.shape[1] != rank or down.dim() not in (2, 4) or up.dim() != down.dim() or (
                    mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
                raise UserError(f"{path}: {down_key} {tuple(down.shape)} and {up_key} {tuple(up.shape)} "
                                f"do not form a LoRA pair", path=str(path))
            mod = LoraModule(down.float(), up.float(), 0.0, mid, keys_used, fmt)
        else:
            factors = {r: slot[r][2].float() for r in _KIND_ROLES[kind] if r in slot}
            mod = LoraModule(None, None, 0.0, None, keys_used, fmt, kind, factors)
            why = _lycoris_problem(mod)
            if why:
                fail(f"{where}: {why}")
                continue
        if "dora_scale" in slot:
            mod.dora_scale = slot["dora_scale"][2].float()
            if mod.dora_scale.numel() == 0:
                fail(f"{where}: an empty dora_scale")
                continue
        mod.alpha = _alpha(slot, mod, component, adapter_md, fmt)
        modules[where] = mod
        formats[fmt] = formats.get(fmt, 0) + 1

    if broken and not allow_partial:
        raise UserError(f"{path}: module {broken[0]}" + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else "")
                        + "; nothing was loaded", path=str(path))
    problems = unknown + incomplete
    if problems and not allow_partial:
        what = "unknown keys" if unknown else "LoRA halves without their partner"
        raise UserError(f"{path}: {len(problems)} {what} that this reader cannot map to a model layer: "
                        f"{_few(problems)}", path=str(path))
    if not modules:
        raise UserError(f"{path}: no LoRA modules found (keys such as {_few(keys, 3)})", path=str(path))
    skipped = problems + broken_keys + [k for ks in unsupported.values() for k in ks]
    if skipped:
        log.warning("%s: %d keys skipped (partial load allowed): %s", path.name, len(skipped), _few(skipped))
    family = _structure_family(modules) or _metadata_family(metadata)
    return LoraFile(path, formats, family, metadata, modules, skipped)


def _alpha(slot: dict, mod: LoraModule, component: str, adapter_md: dict, fmt: str) -> float:
    """The module's alpha: its tensor, an A1111 ``scale`` tensor, PEFT's adapter metadata, or the rank."""
    rank = mod.rank
    if "alpha" in slot:
        alpha = float(slot["alpha"][2].float().item())
    elif "scale" in slot:  # A1111 honours an explicit scale tensor over alpha/r
        alpha = float(slot["scale"][2].float().item()) * rank
    elif component in adapter_md and mod.kind == "lora":
        cfg = adapter_md[component]
        down_key = slot["down"][1]
        live_name = down_key.rsplit(".lora_", 1)[0].removeprefix(component + ".")
        a = float(_pattern_value(cfg.get("alpha_pattern"), live_name, cfg.get("lora_alpha", rank)))
        # so alpha/r = alpha/sqrt(r) (docs/lora-format.md, 'Alpha and scale')
        alpha = a * math.sqrt(rank) if cfg.get("use_rslora") else a
    else:
        # what kohya and diffusers assume when alpha is absent (docs/lora-format.md, 'Alpha and scale')
        alpha = float(rank)
    if alpha == 0.0 and fmt == "kohya":
        alpha = float(rank)  # kohya trains alpha 0 as alpha = r
    return alpha


def _lycoris_problem(mod: LoraModule) -> str | None:
    """What is wrong with a LoHa/LoKr module's set of tensors or their shapes, or None (docs/lora-format.md,
    'DoRA and LyCORIS')."""
    f = mod.factors
    shape = {k: tuple(v.shape) for k, v in f.items()}

    def need(*names):
        missing = [n for n in names if n not in f]
        return f"{', '.join(missing)} missing (a half {KIND_LABELS[mod.kind]} module)" if missing else None

    if mod.kind == "loha":
        tucker = "hada_t1" in f or "hada_t2" in f
        why = need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", *(("hada_t1", "hada_t2") if tucker else ()))
        if why:
            return why
        if any(len(shape[k]) != 2 for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return "the hada_w* tensors must be matrices"
        for i in ("1", "2"):
            a, b = shape[f"hada_w{i}_a"], shape[f"hada_w{i}_b"]
            if tucker:
                t = shape[f"hada_t{i}"]
                ok = len(t) == 4 and t[0] == a[0] and t[1] == b[0]
            else:
                ok = a[1] == b[0]
            if not ok:
                return f"hada_w{i}_a {a}, hada_w{i}_b {b}" + (f", hada_t{i} {shape[f'hada_t{i}']}" if tucker else "") \
                    + " do not multiply"
        o = 1 if tucker else 0  # Tucker: w?_a [r, out]; else w?_a [out, r]
        if shape["hada_w1_a"][o] != shape["hada_w2_a"][o] or shape["hada_w1_b"][1] != shape["hada_w2_b"][1] or (
                tucker and shape["hada_t1"][2:] != shape["hada_t2"][2:]):
            return "the two Hadamard factors have different shapes"
        return None
    has1, has1ab = "lokr_w1" in f, "lokr_w1_a" in f or "lokr_w1_b" in f
    has2, has2ab = "lokr_w2" in f, "lokr_w2_a" in f or "lokr_w2_b" in f or "lokr_t2" in f
    if has1 == has1ab:
        return "needs lokr_w1 or lokr_w1_a + lokr_w1_b (exactly one of them)"
    if has2 == has2ab:
        return "needs lokr_w2 or lokr_w2_a + lokr_w2_b (exactly one of them)"
    why = (need("lokr_w1_a", "lokr_w1_b") if has1ab else None) or (need("lokr_w2_a", "lokr_w2_b") if has2ab else None)
    if why:
        return why
    if has1:
        if len(shape["lokr_w1"]) != 2:
            return f"lokr_w1 {shape['lokr_w1']} must be a matrix"
    elif len(shape["lokr_w1_a"]) != 2 or len(shape["lokr_w1_b"]) != 2 or shape["lokr_w1_a"][1] != shape["lokr_w1_b"][0]:
        return f"lokr_w1_a {shape['lokr_w1_a']} and lokr_w1_b {shape['lokr_w1_b']} do not multiply"
    if has2:
        if len(shape["lokr_w2"]) not in (2, 4):
            return f"lokr_w2 {shape['lokr_w2']} must be a matrix or a conv kernel"
    elif "lokr_t2" in f:
        a, b, t = shape["lokr_w2_a"], shape["lokr_w2_b"], shape["lokr_t2"]
        if len(a) != 2 or len(b) != 2 or len(t) != 4 or t[0] != a[0] or t[1] != b[0]:
            return f"lokr_w2_a {a}, lokr_w2_b {b}, lokr_t2 {t} do not multiply"
    else:
        a, b = shape["lokr_w2_a"], shape["lokr_w2_b"]
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            return f"lokr_w2_a {a} and lokr_w2_b {b} do not multiply"
    return None


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
