"""The generation settings, described once: every front-end's flags, controls and limits come from here.

``lorastudio generate`` / ``grid`` build their flags from ``GENERATE_FIELDS`` and ``GRID_FIELDS``, the Generate tab
builds its controls from the same FieldInfo objects (the schema-to-form code of the training form), training
samples (``[sample]`` in the config) take their ranges from them, and docs/generate.md is generated from them
(a test keeps it current). Values are checked with the config's ``check_value``, so a limit is the same in the
shell and the browser. Importing this module is cheap (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.common.names import FAMILIES
from trainer.config.schema import FieldInfo, check_value, fields_of, opt
from trainer.errors import UserError
from trainer.generate.limits import (MAX_BATCH, MAX_CFG, MAX_CLIP_SKIP, MAX_GRID_CELLS, MAX_SEED, MAX_SIDE,
                                     MAX_STEPS)
from trainer.generate.samplers import SAMPLERS

#: Choice lists that several settings and front-ends share.
FAMILY_CHOICES = ("auto", *FAMILIES)
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")


@dataclass
class GenerateSettings:
    """One image request (``lorastudio generate``, the Generate tab)."""
    negative: str = opt("", "Negative prompt.", label="Negative prompt")
    steps: int = opt(20, "Denoising steps.", min=1, max=MAX_STEPS, label="Steps")
    guidance_scale: float = opt(7.0, "Classifier-free guidance scale.", min=0.0, max=MAX_CFG, label="CFG scale")
    width: int = opt(512, "Width in px (a multiple of 8).", min=8, max=MAX_SIDE, multiple_of=8, label="Width")
    height: int = opt(512, "Height in px (a multiple of 8).", min=8, max=MAX_SIDE, multiple_of=8, label="Height")
    sampler: str = opt("euler", "Sampler (scheduler) by the name A1111 users know: "
                       + ", ".join(f"{k} = {v}" for k, v in SAMPLERS.items()) + ".",
                       choices=tuple(SAMPLERS), label="Sampler")
    seed: int = opt(1, "Seed of the first image; the next images of a batch use seed+1, seed+2, ...",
                    min=0, max=MAX_SEED, label="Seed")
    batch: int = opt(1, "Images per request.", min=1, max=MAX_BATCH, label="Images")
    clip_skip: int = opt(1, "Use the text encoder's N-th hidden state from the end (1 = last, 2 = 'clip skip 2').",
                         min=1, max=MAX_CLIP_SKIP, label="CLIP skip")


@dataclass
class GridSettings:
    """A LoRA-weight x seed comparison grid (``lorastudio grid``, the Generate tab's grid)."""
    weights: str = opt("0,0.5,1", "Comma-separated LoRA weights, one column each.", label="Weights")
    seeds: str = opt("1,2", "Comma-separated seeds, one row each.", label="Seeds")
    max_cells: int = opt(100, "Most pictures one grid may hold (columns x rows); more is refused before any is "
                         "made.", min=1, max=MAX_GRID_CELLS, label="Largest grid")


GENERATE_FIELDS: dict[str, FieldInfo] = {fi.name: fi for fi in fields_of("generate", GenerateSettings)}
GRID_FIELDS: dict[str, FieldInfo] = {fi.name: fi for fi in fields_of("grid", GridSettings)}


def check(name: str, value, source: str = ""):
    """Check one generation setting by name against its range; returns the normalised value."""
    fi = GENERATE_FIELDS.get(name) or GRID_FIELDS.get(name)
    if fi is None:
        raise KeyError(name)
    return check_value(fi, value, source)


def check_grid_size(cells: int, max_cells: int = MAX_GRID_CELLS) -> None:
    """Refuse a grid of more than ``max_cells`` pictures (itself at most MAX_GRID_CELLS) before any is made."""
    limit = min(int(max_cells), MAX_GRID_CELLS)
    if cells > limit:
        raise UserError(f"grid: {cells} pictures is too many for one grid (at most {limit})", field="grid")


def parse_numbers(text: str, what: str, cast=float) -> list:
    """A grid's list of weights or seeds as typed ("0, 0.5, 1"; ';' works too), or a one-line error naming
    ``what`` (the flag or the field)."""
    out = []
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if part:
            try:
                out.append(cast(part))
            except ValueError:
                raise UserError(f"{what}: '{part}' is not a {'whole ' if cast is int else ''}number") from None
    if not out:
        raise UserError(f"{what}: give at least one value, e.g. {'1, 2' if cast is int else '0, 0.5, 1'}")
    return out
