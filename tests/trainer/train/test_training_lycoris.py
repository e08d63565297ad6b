"""LoHa, LoKr and DoRA runs on a tiny model (docs/lora-format.md, 'DoRA and LyCORIS'): the file has the LyCORIS
names and metadata, and stop + resume writes the same tensors as an uninterrupted run, as for LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import config as C
from trainer.errors import UserError
from trainer.train.recipe import train

from tests.fixtures.runs import tiny_overrides


@pytest.mark.parametrize("kind,extra,suffix", [
    ("loha", {"lora.rank_dropout": 0.1, "lora.module_dropout": 0.2}, "hada_w1_a"),  # what sd15-loha-style sets
    ("lokr", {"lora.lokr_factor": 4, "lora.module_dropout": 0.2}, "lokr_w1"),
    ("dora", {"lora.dropout": 0.1}, "dora_scale"),
])
def test_stop_and_resume_equals_uninterrupted(kind, extra, suffix, tiny_sd1_dir, image_folder, tmp_path):
    # small: 64 px, one image a step, no text encoder (each run trains three times)
    sets = {"lora.type": kind, "train.save_every_steps": 2, "data.resolution": 64, "data.max_bucket_px": 128,
            "train.batch_size": 1, "lora.train_text_encoder": False, **extra}
    ref = train(C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "a", steps=3, **sets)))
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "b", steps=3, **sets))
    state = {"step": 0}

    def on_event(e):
        if e.type == "step":
            state["step"] = e.step

    assert train(cfg, on_event=on_event, should_stop=lambda: state["step"] >= 2).status == "stopped"
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed" and resumed.step == 3
    a, b = load_file(str(ref.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and any(k.endswith("." + suffix) for k in a)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    with safe_open(str(ref.lora_path), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya"
    args = json.loads(md["ss_network_args"])
    assert args["algo"] == {"dora": "locon"}.get(kind, kind)
    if kind == "dora":
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"


def test_options_the_type_cannot_use_are_one_line_errors(tiny_sd1_dir, image_folder, tmp_path):
    for sets, words in (({"lora.type": "loha", "lora.dropout": 0.1}, "lora.dropout"),
                        ({"lora.type": "lora", "lora.rank_dropout": 0.1}, "lora.rank_dropout"),
                        ({"lora.type": "dora", "lora.lokr_full_matrix": True}, "lora.lokr_full_matrix"),
                        ({"lora.type": "lokr", "output.also_diffusers": True}, "output.also_diffusers")):
        cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "x", steps=1, **sets))
        with pytest.raises(UserError, match=words) as e:
            train(cfg)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "x" / "run" / "run.safetensors").exists()
