"""What a LoRA file is (``lorastudio inspect``): formats, base family, ranks, alphas, keys, metadata and the
A1111/Civitai hash, as a dict and as readable text. ``trainer.generate.engine`` re-exports these names."""

from __future__ import annotations

from pathlib import Path

from trainer.common.safetensors_header import read_header
from trainer.errors import UserError


def _addnet(lora) -> str:
    h = getattr(lora, "addnet_hash", None)
    if h:
        return str(h)
    from trainer.lora.io import lora_addnet_hash
    return lora_addnet_hash(lora.path)


def inspect_lora(path: str | Path) -> dict:
    """What a LoRA file is: format(s), base family, ranks, alphas, module and key counts, metadata, hash."""
    from trainer.lora.io import read_lora

    p = Path(path)
    if not p.is_file():
        raise UserError(f"LoRA file not found: {p}", path=str(p))
    try:
        lora = read_lora(p, allow_partial=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"LoRA file {p}: not a readable LoRA ({type(e).__name__})", path=str(p)) from None
    per_comp: dict[str, dict] = {}
    ranks, alphas, dtypes = set(), set(), set()
    types: dict[str, int] = {}  # "LoRA", "LoCon", "LoHa", "LoKr", "LoRA+DoRA", ... -> modules
    tensors = 0
    for key, lm in lora.modules.items():
        comp = key.split(":", 1)[0]
        c = per_comp.setdefault(comp, {"modules": 0, "ranks": set(), "alphas": set(), "conv": 0})
        c["modules"] += 1
        r = int(lm.rank)
        alpha = float(lm.alpha) if lm.alpha is not None else float(r)
        c["ranks"].add(r)
        c["alphas"].add(alpha)
        kernel = lm.out_in()[2]
        if kernel is not None and tuple(kernel) != (1, 1):
            c["conv"] += 1
        ranks.add(r)
        alphas.add(alpha)
        types[lm.label] = types.get(lm.label, 0) + 1
        for t in lm.tensors().values():
            dtypes.add(str(t.dtype).replace("torch.", ""))
            tensors += 1
        if lm.alpha is not None:
            tensors += 1
    meta = dict(lora.metadata or {})
    addnet = _addnet(lora)
    header = read_header(p).tensors  # the file's own dtypes (the reader keeps fp32 copies)
    if header:
        dtypes = {_DTYPES.get(v.dtype, v.dtype.lower()) for v in header.values()
                  if v.shape}  # weights only, not the 0-dim alphas
    key_count = len(header) if header else None
    return {
        "path": str(p),
        "file_size": p.stat().st_size,
        "formats": sorted(lora.formats) if not isinstance(lora.formats, dict) else dict(lora.formats),
        "family": lora.family,
        "modules": len(lora.modules),
        "keys": key_count if key_count is not None else tensors,
        "components": {c: {"modules": v["modules"], "ranks": sorted(v["ranks"]), "alphas": sorted(v["alphas"]),
                           "conv_3x3": v["conv"]} for c, v in sorted(per_comp.items())},
        "types": dict(sorted(types.items())),
        "network_module": meta.get("ss_network_module", ""),
        "trigger_words": trigger_words(meta),
        "ranks": sorted(ranks),
        "alphas": sorted(alphas),
        "dtypes": sorted(dtypes),
        "addnet_hash": addnet,
        "short_hash": addnet[:12],
        "output_name": meta.get("ss_output_name", ""),
        "base_model": meta.get("ss_sd_model_name", "") or meta.get("modelspec.architecture", ""),
        "skipped_keys": list(getattr(lora, "skipped", []) or []),
        "metadata": meta,
    }


def trigger_words(meta: dict, most: int = 5) -> list[str]:
    """The activation words a file names: ``modelspec.trigger_phrase``, then the most frequent caption tags of
    ``ss_tag_frequency`` (what A1111's and Civitai's file info show)."""
    import json
    out: list[str] = []
    phrase = str(meta.get("modelspec.trigger_phrase", "") or "").strip()
    if phrase:
        out.append(phrase)
    try:
        freq = json.loads(meta.get("ss_tag_frequency", "") or "{}")
    except (json.JSONDecodeError, TypeError):
        freq = {}
    counts: dict[str, int] = {}
    for tags in (freq.values() if isinstance(freq, dict) else []):
        for tag, n in (tags.items() if isinstance(tags, dict) else []):
            if isinstance(n, (int, float)):
                counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(n)
    for tag, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if tag and tag not in out and len(out) < most:
            out.append(tag)
    return out


def summary_line(info: dict) -> str:
    """One line for a file list: type, rank, base family, triggers, short hash."""
    fam = {"sd1": "SD1.x/SD2.x", "sdxl": "SDXL"}.get(info.get("family"), "unknown base")
    types = "/".join(info.get("types", {})) or "LoRA"
    ranks = "/".join(map(str, info.get("ranks", [])))
    trig = f", triggers: {', '.join(info['trigger_words'][:3])}" if info.get("trigger_words") else ""
    return f"{types}, rank {ranks}, {fam}{trig}, hash {info.get('short_hash', '')}"


_SUMMARIES: dict[tuple, str] = {}


def file_summary(path: str | Path) -> str:
    """``summary_line`` of a file, remembered per (path, mtime, size); a file that cannot be read says why."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SUMMARIES:
        try:
            _SUMMARIES[key] = summary_line(inspect_lora(p))
        except UserError as e:
            _SUMMARIES[key] = str(e)
        if len(_SUMMARIES) > 256:
            _SUMMARIES.pop(next(iter(_SUMMARIES)))
    return _SUMMARIES[key]


_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
           "I32": "int32", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def format_inspection(info: dict, *, max_value_chars: int = 200) -> str:
    """`inspect_lora`'s result as readable text (long metadata values shortened)."""
    fam = {"sd1": "SD1.x / SD2.x (SD1-style names)", "sdxl": "SDXL"}.get(info["family"], info["family"] or "unknown")
    formats = info["formats"]
    formats = ", ".join(f"{k} ({v} modules)" for k, v in formats.items()) if isinstance(formats, dict) \
        else ", ".join(formats)
    lines = [f"file:        {info['path']} ({info['file_size'] / 1024:.1f} KiB)",
             f"format:      {formats}",
             f"type:        {', '.join(f'{k} ({v} modules)' for k, v in info.get('types', {}).items())}"
             + (f" [{info['network_module']}]" if info.get("network_module") else ""),
             f"base family: {fam}",
             f"modules:     {info['modules']} ({info['keys']} tensors)",
             f"rank(s):     {', '.join(map(str, info['ranks']))}",
             f"alpha(s):    {', '.join(f'{a:g}' for a in info['alphas'])}",
             f"dtypes:      {', '.join(info['dtypes'])}",
             f"addnet hash: {info['addnet_hash']} (A1111/Civitai AutoV3: {info['short_hash']})"]
    if info.get("trigger_words"):
        lines.insert(3, f"triggers:    {', '.join(info['trigger_words'])}")
    if info.get("skipped_keys"):
        lines.append(f"not understood: {len(info['skipped_keys'])} keys, e.g. {', '.join(info['skipped_keys'][:3])} "
                     "(the file loads only with --allow-partial)")
    for comp, c in info["components"].items():
        lines.append(f"  {comp:<15} {c['modules']:>4} modules, rank {'/'.join(map(str, c['ranks']))}, "
                     f"alpha {'/'.join(f'{a:g}' for a in c['alphas'])}"
                     + (f", {c['conv_3x3']} conv 3x3" if c["conv_3x3"] else ""))
    if info["metadata"]:
        lines.append("metadata:")
        for k in sorted(info["metadata"]):
            v = str(info["metadata"][k]).replace("\n", " ")
            if len(v) > max_value_chars:
                v = v[:max_value_chars] + f"... ({len(v)} chars)"
            lines.append(f"  {k}: {v}")
    else:
        lines.append("metadata:    (none)")
    return "\n".join(lines)
