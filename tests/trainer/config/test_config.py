"""The config schema, --set overrides, presets and the CLI built from them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainer import config as C
from trainer.errors import UserError
from trainer.config.presets import (list_presets, preset_text, resolve_preset, save_user_preset, validate_preset_text)

REQUIRED_KEYS = ["model.base", "data.dir", "data.resolution", "lora.rank", "lora.alpha", "lora.train_text_encoder",
                 "train.max_steps", "train.batch_size", "train.learning_rate", "train.seed", "output.dir",
                 "output.name"]


def test_required_keys_exist_with_help():
    for key in REQUIRED_KEYS:
        assert key in C.FIELDS, key
    for fi in C.FIELDS.values():
        assert fi.help, f"{fi.key} has no help"
        if fi.type in (int, float):
            assert fi.choices or (fi.min is not None and fi.max is not None), f"{fi.key} has no range"


def test_overrides_parse_types():
    cfg = C.load_config(None, ["train.max_steps=1e3", "train.learning_rate=3e-4", "lora.train_text_encoder=no",
                               "sample.prompts=a cat|a dog", "output.name=run1"])
    assert cfg.train.max_steps == 1000 and cfg.train.learning_rate == 3e-4
    assert cfg.lora.train_text_encoder is False and cfg.sample.prompts == ["a cat", "a dog"]


@pytest.mark.parametrize("override, expected", [
    ("train.max_step=5", "unknown key 'train.max_step' (did you mean 'train.max_steps'?)"),
    ("train.rank=4", "did you mean 'lora.rank'"),
    ("train.max_steps=-3", "train.max_steps"),
    ("train.max_steps=ten", "train.max_steps: expected int"),
    ("train.learning_rate=nan", "train.learning_rate"),
    ("train.optimizer=adam", "train.optimizer"),
    ("lora.rank", "expected section.key=value"),
    ("data.max_token_length=100", "data.max_token_length in --set: 100 is not one of 75, 150, 225"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(UserError) as e:
        C.load_config(None, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_toml_types_refused(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text('preset_version = 1\n[train]\nmax_steps = "many"\n')
    with pytest.raises(UserError, match=r"train.max_steps in .*x.toml: expected int"):
        C.load_config(p)
    p.write_text('preset_version = 1\n[trian]\nmax_steps = 3\n')
    with pytest.raises(UserError, match="did you mean 'train'"):
        C.load_config(p)
    p.write_text('preset_version = 99\n')
    with pytest.raises(UserError, match="newer than this LoRA Studio"):
        C.load_config(p)


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config(resolve_preset("sdxl-character"), ["data.dir=/data/x", "sample.prompts=a \"quoted\" prompt"])
    p = tmp_path / "config.toml"
    p.write_text(C.config_to_toml(cfg, header="resolved"))
    again = C.load_config(p)
    assert C.config_to_dict(again) == C.config_to_dict(cfg)


def test_every_shipped_preset_is_valid_and_partial():
    shipped = [p for p in list_presets() if p.source == "shipped"]
    names = {p.name for p in shipped}
    assert {"sd15-style", "sd15-character", "sdxl-style", "sdxl-character", "sdxl-lowvram"} <= names
    for p in shipped:
        text = p.path.read_text()
        assert text.startswith("#") and "preset_version" in text
        cfg = validate_preset_text(text, str(p.path))
        assert C.diff_from_defaults(cfg), f"{p.name} changes nothing"
        assert p.summary


def test_user_preset_save_and_import_limits(tmp_path):
    cfg = C.load_config(None, ["lora.rank=8"])
    path = save_user_preset("mine", cfg)
    assert resolve_preset("mine") == path
    assert "rank = 8" in path.read_text() and "max_steps" not in path.read_text()
    with pytest.raises(UserError, match="larger than"):
        validate_preset_text("# x\n" * 40000)
    with pytest.raises(UserError, match="no preset_version"):
        validate_preset_text("[lora]\nrank = 4\n")
    with pytest.raises(UserError, match="outside the allowed folders"):
        validate_preset_text('preset_version = 1\n[data]\ndir = "/etc"\n', allowed_roots=[tmp_path])
    ok = validate_preset_text('preset_version = 1\n[data]\ndir = "%s"\n' % (tmp_path / "d"), allowed_roots=[tmp_path])
    assert ok.data.dir.endswith("d")
    assert "rank = 8" in preset_text(cfg, "h")


def test_cli_help_lists_every_key():
    out = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, check=True).stdout
    for key in C.FIELDS:
        assert key in out


def test_cli_unknown_key_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "app.cli", "train", "--set", "lora.rnk=4"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown key 'lora.rnk' (did you mean 'lora.rank'?)"


def test_docs_config_table_is_generated_from_the_schema():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[3] / "docs" / "config.md").read_text(encoding="utf-8")
    assert C.help_table(markdown=True) in doc, "docs/config.md is stale: regenerate with lorastudio presets keys --markdown"
