"""Resize a LoRA: the best delta of a lower (or dynamically chosen) rank per module, by SVD (docs/lora-format.md,
'LoRA tools')."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from trainer.errors import UserError
from trainer.lora.io import read_lora
from trainer.lora.tools.svd import (Dynamic, check_rank, choose_rank, energy, low_rank_of, refuse_dora, svd_of_pair,
                                    to_module)
from trainer.lora.tools.write import (ModuleReport, ToolResult, check_output, converted_note, family_of,
                                      source_record, tool_metadata, write_lora)

log = logging.getLogger(__name__)


def check_layer_rank(rank: int | None, key: str, max_rank: int, shape: tuple, flag: str = "--rank") -> None:
    if rank is not None and rank > max_rank:
        raise UserError(f"{flag} {rank} is above the size of module {key} (a {'x'.join(map(str, shape))} layer "
                        f"holds rank {max_rank} at most)")


def resize_lora(path: str | Path, out: str | Path, *, rank: int | None = None, dynamic: Dynamic | None = None,
                save_precision: str = "fp16", overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None) -> ToolResult:
    """Write ``path`` at ``rank`` (or the rank ``dynamic`` picks, ``rank`` then caps it) to ``out``.

    Each module's delta is factored exactly (QR of both factors, SVD of the small core) and its leading
    singular triplets kept; a rank at or above the module's own keeps the delta as it is. alpha/rank of each
    module stays the source's (the factors carry the singular values).

    A LoHa or LoKr module is taken from its full delta (SVD, exact to rounding) and written as a plain LoRA of
    at most the delta's rank, alpha = rank (``ToolResult.converted``, metadata ``lorastudio_converted``); a DoRA
    module is refused with one line (its delta needs the base weight).
    """
    check_rank(rank)
    if rank is None and dynamic is None:
        raise UserError("resize: give --rank R, --dynamic MODE=VALUE, or both (the rank then caps it)")
    out = check_output(out, overwrite=overwrite)
    lf = read_lora(path)
    family = family_of(lf)
    if family is None:
        log.warning("%s: its base family is unknown; writing SD1-style names", lf.path.name)
        family = "sd1"
    for key, mod in lf.modules.items():  # refused before any SVD
        refuse_dora(mod, key, lf.path, "resize")
    modules, reports, converted = {}, [], []
    total = len(lf.modules)
    for i, (key, mod) in enumerate(lf.modules.items()):
        lr = low_rank_of(mod, key=key, source=lf.path, tool="resize")
        check_layer_rank(rank, key, lr.max_rank, lr.weight_shape)
        svd = svd_of_pair(lr)
        k = choose_rank(svd.s, min(rank, lr.rank) if rank else lr.rank, dynamic)
        if mod.kind == "lora":
            modules[key] = to_module(svd, k, scale=mod.scale)
        else:
            modules[key] = to_module(svd, k)
            converted.append(key)
        reports.append(ModuleReport(key, lr.rank, k, energy(svd.s), energy(svd.s, k)))
        if progress:
            progress(i + 1, total)
    md = tool_metadata("resize", modules, sources=[source_record(lf)], inherited=lf.metadata, title=out.stem, family=family,
                       args={"rank": rank, "dynamic": str(dynamic) if dynamic else None,
                             "precision": save_precision}, converted=converted_note([lf.modules[k].label for k in converted]))
    written = write_lora(out, modules, family=family, metadata=md, save_precision=save_precision,
                         overwrite=overwrite)
    return ToolResult(written, reports, converted=converted)
