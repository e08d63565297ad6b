"""The generation settings are the one source of limits: the engine's own checks go through them, the sampler
table is the one list of samplers, and the split-out modules are still reachable from trainer.generate.engine."""

from __future__ import annotations

import pytest

from trainer.errors import UserError
from trainer.generate import limits as L
from trainer.generate.settings import GENERATE_FIELDS, check, check_grid_size


def test_engine_image_checks_are_the_settings():
    from trainer.generate.engine import check_image_size
    check_image_size(L.MAX_SIDE, 8, L.MAX_STEPS, L.MAX_BATCH)
    for args, match in [((L.MAX_SIDE + 8, 512, 20), "generate.width: 4104 is above the maximum 4096"),
                        ((512, 12, 20), "generate.height: 12 is not a multiple of 8"),
                        ((512, 512, 0), "generate.steps: 0 is below the minimum 1"),
                        ((512, 512, 20, L.MAX_BATCH + 1), "generate.batch: 17 is above the maximum 16")]:
        with pytest.raises(UserError, match=match):
            check_image_size(*args)
    check_image_size(512, 512, 20, None)  # internal callers: no per-request image limit


def test_check_and_grid_size():
    assert check("guidance_scale", 5) == 5.0 and isinstance(check("guidance_scale", 5), float)
    with pytest.raises(UserError, match="generate.clip_skip"):
        check("clip_skip", L.MAX_CLIP_SKIP + 1)
    with pytest.raises(KeyError):
        check("nope", 1)
    check_grid_size(L.MAX_GRID_CELLS)
    with pytest.raises(UserError, match=r"101 pictures is too many for one grid \(at most 100\)"):
        check_grid_size(L.MAX_GRID_CELLS + 1)
    with pytest.raises(UserError, match=r"at most 100"):
        check_grid_size(150, max_cells=500)  # a larger max_cells cannot lift the hard limit
    with pytest.raises(UserError, match=r"at most 4\)"):
        check_grid_size(6, max_cells=4)


def test_sampler_table_is_the_one_list():
    from trainer.config import FIELDS
    from trainer.generate.samplers import SAMPLERS, make_sampler
    assert GENERATE_FIELDS["sampler"].choices == tuple(SAMPLERS) == FIELDS["sample.sampler"].choices
    cfg = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    kinds = {name: type(make_sampler(name, cfg)).__name__ for name in SAMPLERS}
    assert kinds["euler_a"] == "EulerAncestralDiscreteScheduler" and kinds["unipc"] == "UniPCMultistepScheduler"
    assert make_sampler("dpmpp_2m_karras", cfg).config.use_karras_sigmas is True
    with pytest.raises(UserError, match="unknown sampler 'Euler'; choose one of euler, euler_a"):
        make_sampler("Euler", cfg)


def test_engine_reexports_the_split_modules():
    from trainer.generate import engine, inspection, library
    for name in ("list_lora_saves", "resolve_lora", "find_lora", "list_loras"):
        assert getattr(engine, name) is getattr(library, name)
    for name in ("inspect_lora", "format_inspection"):
        assert getattr(engine, name) is getattr(inspection, name)
    assert not hasattr(engine, "list_checkpoints")  # renamed: train.checkpoint.list_checkpoints is another thing


def test_grid_lists_parse_the_same_for_the_cli_and_the_gui():
    from trainer.errors import UserError
    from trainer.generate.settings import parse_numbers
    assert parse_numbers("0, 0.5;1", "--weights") == [0.0, 0.5, 1.0]
    assert parse_numbers("1,2", "grid seeds", int) == [1, 2]
    with pytest.raises(UserError, match="--seeds: '1.5' is not a whole number"):
        parse_numbers("1, 1.5", "--seeds", int)
    with pytest.raises(UserError, match="grid weights: give at least one value"):
        parse_numbers(" , ", "grid weights")
