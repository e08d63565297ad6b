"""Merge LoRAs: per module, the SVD of the weighted sum of their deltas at a rank, or all ranks stacked (exact)
(docs/lora-format.md, 'LoRA tools')."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from trainer.errors import UserError
from trainer.lora.io import FAMILY_LABELS, read_lora
from trainer.lora.tools.resize import check_layer_rank
from trainer.lora.tools.svd import (Dynamic, check_rank, choose_rank, energy, low_rank_of, pair_energy,
                                    pair_to_module, refuse_dora, same_layer, stack, svd_of_pair, to_module)
from trainer.lora.tools.write import (BASE_KEYS, ModuleReport, ToolResult, check_output, converted_note, family_of,
                                      source_record, tool_metadata, write_lora)


def parse_source(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` -> (file, weight); the weight defaults to 1."""
    head, sep, tail = str(text).rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return str(text), 1.0


def merge_loras(sources: list[tuple[str | Path, float]], out: str | Path, *, rank: int | None = None,
                dynamic: Dynamic | None = None, concat: bool = False, save_precision: str = "fp16",
                overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> ToolResult:
    """Merge ``sources`` ((file, weight) pairs) into ``out``.

    SVD mode: per module, Σ w_i ΔW_i factored exactly and cut to ``rank`` (or what ``dynamic`` picks); at the
    summed rank it is exact. ``concat``: the factors stacked (down = the downs, up = the ups times w_i·alpha_i/r_i),
    always exact. A module in only some files is merged from those. Output alpha = rank (scale 1).

    A LoHa or LoKr module enters as its full delta's SVD (exact to rounding; the output is a plain LoRA,
    ``ToolResult.converted`` and metadata ``lorastudio_converted`` say which); a DoRA module is refused with one
    line (its delta needs the base weight).
    """
    if not sources:
        raise UserError("merge: give at least one LoRA file")
    if concat and (rank is not None or dynamic is not None):
        raise UserError("merge: --concat stacks every rank as it is; leave out --rank and --dynamic")
    if not concat:
        check_rank(rank)
        if rank is None and dynamic is None:
            raise UserError("merge: give --rank R (or --dynamic MODE=VALUE), or --concat")
    out = check_output(out, overwrite=overwrite)
    files = [(read_lora(p), float(w)) for p, w in sources]
    for lf, _ in files:  # refused before any SVD
        for key, mod in lf.modules.items():
            refuse_dora(mod, key, lf.path, "merge")

    families = {}
    for lf, _ in files:
        fam = family_of(lf)
        if fam is not None:
            families.setdefault(fam, lf)
    if len(families) > 1:
        (fa, a), (fb, b) = list(families.items())[:2]
        raise UserError(f"{a.path.name} is a LoRA for {FAMILY_LABELS[fa]} models and {b.path.name} one for "
                        f"{FAMILY_LABELS[fb]} models; they cannot be merged")
    family = next(iter(families), "sd1")

    keys: dict[str, None] = {}
    for lf, _ in files:
        keys.update(dict.fromkeys(lf.modules))
    modules, reports, converted, labels = {}, [], [], []
    for i, key in enumerate(keys):
        parts, owners = [], []
        for lf, w in files:
            mod = lf.modules.get(key)
            if mod is None:
                continue
            lr = low_rank_of(mod, w, key=key, source=lf.path, tool="merge")
            if mod.kind != "lora":
                labels.append(mod.label)
                if key not in converted:
                    converted.append(key)
            if parts and not same_layer(parts[0], lr):
                raise UserError(f"module {key}: {owners[0].path.name} patches a "
                                f"{'x'.join(map(str, parts[0].weight_shape))} layer, {lf.path.name} a "
                                f"{'x'.join(map(str, lr.weight_shape))} one; the files are for different models")
            parts.append(lr)
            owners.append(lf)
        summed = stack(parts)
        if concat:
            modules[key] = pair_to_module(summed)
            e = pair_energy(summed)
            reports.append(ModuleReport(key, summed.rank, summed.rank, e, e))
        else:
            check_layer_rank(rank, key, summed.max_rank, summed.weight_shape)
            svd = svd_of_pair(summed)
            k = choose_rank(svd.s, min(rank, summed.rank) if rank else summed.rank, dynamic)
            modules[key] = to_module(svd, k)
            reports.append(ModuleReport(key, summed.rank, k, energy(svd.s), energy(svd.s, k)))
        if progress:
            progress(i + 1, len(keys))

    inherited = {}
    for lf, _ in files:
        inherited.update({k: lf.metadata[k] for k in BASE_KEYS if k in lf.metadata and k not in inherited})
    md = tool_metadata("merge", modules, sources=[source_record(lf, weight=w) for lf, w in files],
                       inherited=inherited, title=out.stem, family=family,
                       args={"mode": "concat" if concat else "svd", "rank": rank,
                             "dynamic": str(dynamic) if dynamic else None, "precision": save_precision},
                       converted=converted_note(labels))
    written = write_lora(out, modules, family=family, metadata=md, save_precision=save_precision,
                         overwrite=overwrite)
    return ToolResult(written, reports, converted=converted)
