"""The toy-world research scripts (LoRA harness, ablations, pretraining) end to end, cut short."""

from __future__ import annotations

import numpy as np
import pytest

from datasets_tools import toyworld as tw

from tests.fixtures.toyworld import BASE


# ---------------------------------------------------------------- phase 2 tooling (style LoRAs on the toy base)

def test_style_lora_tooling_trains_through_the_cli_and_scores_through_the_engine(tmp_path):
    """The harness of docs/toyworld.md phase 2 and benchmarks/toyworld/ablations.py: a few steps through
    `lorastudio train` with the shipped toyworld-style preset, then sampling through the generation engine."""
    pytest.importorskip("torch")
    from benchmarks.toyworld import harness as tl
    recs = tl.make_style_set(tmp_path / "style", "shadow", 15)
    assert all(r["caption"].startswith("zxq style, ") for r in recs)
    tl.make_reg_set(tmp_path / "reg", 15)
    lora = tl.train_style_lora(tmp_path / "style", tmp_path / "runs", "toy", reg_dir=tmp_path / "reg",
                               overrides={"train.max_steps": 3, "train.batch_size": 4})
    from safetensors import safe_open
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_num_reg_images"] == "15"       # the regularisation set was used (kohya's keys)
        assert "img_count" in f.metadata()["ss_reg_dataset_dirs"]
        assert any(k.startswith("lora_te_") for k in f.keys())  # text encoder trained (the preset's setting)
        assert any(k.startswith("lora_unet_") and "_conv1." in k for k in f.keys())  # LoCon on the convs
    ev = tl.Evaluator()
    prompts = tw.prompts(3, seed=0, trigger="zxq style")
    base = ev.images(prompts)
    ev.set_loras([(lora, 0.0)])
    assert all(np.array_equal(a, b) for a, b in zip(base, ev.images(prompts)))  # weight 0 is the base
    ev.set_loras([(lora, 1.0)])
    scores, imgs = ev.score(prompts)
    assert len(imgs) == 3 and imgs[0].shape == (64, 64, 3) and scores.n == 3
    assert any(not np.array_equal(a, b) for a, b in zip(base, imgs))  # the LoRA is applied
    with pytest.raises(RuntimeError, match="lorastudio train exited"):
        tl.train_style_lora(tmp_path / "nope", tmp_path / "runs", "bad")


def test_ablation_script_writes_the_table(tmp_path):
    """`python -m benchmarks.toyworld.ablations` end to end on one variant, cut to 2 steps (a smoke run)."""
    pytest.importorskip("torch")
    from benchmarks.toyworld import ablations as ab
    out = tmp_path / "ablations.md"
    assert ab.main(["--only", "unet_only", "--n", "3", "--max-steps", "2", "--out", str(out),
                    "--work", str(tmp_path / "work")]) == 0
    text = out.read_text()
    assert "Smoke run" in text and "| base model, no LoRA |" in text and "| unet_only: UNet-only LoRA" in text
    lora = tmp_path / "work" / "runs" / "unet_only" / "unet_only.safetensors"
    mtime = lora.stat().st_mtime_ns
    assert ab.main(["--only", "unet_only", "--n", "3", "--max-steps", "2", "--out", str(out),
                    "--work", str(tmp_path / "work"), "--reuse"]) == 0           # score again, do not train again
    assert lora.stat().st_mtime_ns == mtime and "Scored with `--reuse`" in out.read_text()
    assert ab.main(["--only", "rank99"]) == 2  # an unknown variant is one line and exit 2


def test_pretraining_script_runs_every_stage_cut_short(tmp_path):
    """`python -m benchmarks.toyworld.pretrain` end to end (tokenizer, VAE, decoder, UNet, save) with 2 steps a stage:
    the folder it writes loads like the committed one and records what it did."""
    pytest.importorskip("torch")
    from benchmarks.toyworld import pretrain as tp
    out = tmp_path / "toy"
    assert tp.main(["--out", str(out), "--vae-steps", "2", "--decoder-steps", "2", "--unet-steps", "2",
                    "--n-vae-images", "32", "--n-images", "64", "--n-decoder-images", "32", "--vae-batch", "4",
                    "--unet-batch", "4"]) == 0
    info = __import__("json").loads((out / "toyworld_pretrain.json").read_text())
    assert (info["vae_steps_done"], info["decoder_steps_done"], info["unet_steps_done"]) == (2, 2, 2)
    assert not out.with_name("toy.work").exists()
    pipe = tp.load_toyworld(out)
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]


def test_decoder_only_stage_keeps_the_latent_space(tmp_path):
    """`python -m benchmarks.toyworld.pretrain --decoder-only` (how the committed decoder was made), cut to 2 steps:
    it changes the decoder only, so the encoder, UNet, text encoder and with them any LoRA stay valid."""
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    from benchmarks.toyworld import pretrain as tp
    out = tmp_path / "toy"
    assert tp.main(["--decoder-only", str(BASE), "--out", str(out), "--decoder-steps", "2",
                    "--n-decoder-images", "32"]) == 0
    old, new = (load_file(str(f / "vae" / "diffusion_pytorch_model.safetensors")) for f in (BASE, out))
    enc = [k for k in old if not k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and all(np.array_equal(old[k].numpy(), new[k].numpy()) for k in enc)
    assert any(not np.array_equal(old[k].numpy(), new[k].numpy()) for k in old if k not in enc)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "unet/config.json", "vae/config.json"):
        assert (BASE / part).read_bytes() == (out / part).read_bytes(), part
    info = __import__("json").loads((out / "toyworld_pretrain.json").read_text())
    assert info["decoder_stage"]["steps_done"] == 2 and info["unet_steps_done"] == 4135
    tp.load_toyworld(out)  # loads like the committed one


def test_demo_script_measures_the_demo_a_user_makes(tmp_path):
    """`python -m benchmarks.toyworld.demo` (the per-style figures of docs/gui.md) end to end, cut to 2 steps: the
    demo folders and preset from app.demo, template captions with the trigger, `lorastudio train --preset demo` in
    the style's own LORASTUDIO_HOME, then the suite's scoring with the demo's trigger."""
    pytest.importorskip("torch")
    from benchmarks.toyworld import demo
    md = tmp_path / "demo.md"
    assert demo.main(["--work", str(tmp_path / "w"), "--styles", "outline", "--max-steps", "2", "--n", "2",
                      "--markdown", str(md)]) == 0
    captions = sorted((tmp_path / "w" / "outline" / "demo" / "outline" / "images").glob("*.txt"))
    assert len(captions) == 30 and all(c.read_text().startswith("zxq style, ") for c in captions)
    assert (tmp_path / "w" / "outline" / "home" / "presets" / "demo.toml").is_file()  # not the user's own home
    row = md.read_text().splitlines()[2]
    assert row.startswith("| `outline` |") and row.split("|")[6].strip() == "2"  # the run's steps
    assert demo.main(["--work", str(tmp_path / "w"), "--styles", "stripes"]) == 2  # not a demo style
