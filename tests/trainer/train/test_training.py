"""End-to-end training on tiny models: files, events, samples, stop/resume equality, multi-process, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import config as C
from trainer.train.events import read_events
from trainer.train.recipe import train

from tests.fixtures.runs import tiny_overrides
from tests.fixtures.waits import HANG_S

ROOT = Path(__file__).resolve().parents[3]


def run_cfg(overrides: list[str]) -> C.Config:
    return C.load_config(None, overrides)


def test_sd1_run_writes_lora_events_samples_and_replayable_config(tiny_sd1_dir, image_folder, tmp_path):
    cfg = run_cfg(tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "out", steps=4, **{
        "sample.every_steps": 2, "sample.prompts": ["zxq style, a red circle"], "sample.steps": 2,
        "sample.width": 64, "sample.height": 64}))
    seen = []
    res = train(cfg, on_event=seen.append)
    run = tmp_path / "out" / "run"
    assert res.status == "completed" and res.lora_path == run / "run.safetensors"
    # the LoRA: kohya names, alpha per module, text encoder included, metadata with the resolved config
    with safe_open(str(res.lora_path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert C.load_config(None).train.max_steps != 4
    again = C.load_config(run / "config.toml")
    assert again.train.max_steps == 4 and again.model.base == str(tiny_sd1_dir)
    assert "max_steps = 4" in meta["lorastudio.config"]
    # events: started, one per step with loss/lr/speed/ETA, samples, ended
    events = read_events(run / "events.jsonl")
    types = [e["type"] for e in events]
    assert types[0] in ("log", "phase", "run_started") and types[-1] == "run_ended"
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e["loss"] > 0 and e["lr"] > 0 and e["it_per_s"] > 0 and e["eta_s"] >= 0 for e in steps)
    assert events[-1]["status"] == "completed" and events[-1]["lora_path"].endswith("run.safetensors")
    assert [e.step for e in seen if e.type == "step"] == [1, 2, 3, 4]
    samples = [e for e in events if e["type"] == "sample"]
    assert {e["step"] for e in samples} == {2, 4}
    png = Image.open(samples[0]["path"])
    assert png.size == (64, 64) and "Seed: 1" in png.text["parameters"] and "zxq style" in png.text["parameters"]
    # the intermediate save and resumable checkpoint
    assert (run / "run-step00000002.safetensors").exists() is False  # save_every_steps was 0
    assert (run / "checkpoints").is_dir()


def test_sdxl_run_trains_both_text_encoders(tiny_sdxl_dir, image_folder, tmp_path):
    cfg = run_cfg(tiny_overrides(tiny_sdxl_dir, image_folder, tmp_path / "out", steps=2))
    res = train(cfg)
    keys = list(load_file(str(res.lora_path)).keys())
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SGM names for SDXL
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys)


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def _assert_same(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= tol, f"max difference {worst}"


def test_stop_and_resume_equals_uninterrupted(tiny_sd1_dir, image_folder, tmp_path):
    extra = {"train.save_every_steps": 3, "data.shuffle_caption": True, "data.caption_dropout": 0.2,
             "lora.dropout": 0.1, "train.lr_scheduler": "cosine", "train.lr_warmup_steps": 2,
             "train.noise_offset": 0.05, "train.min_snr_gamma": 5.0, "data.flip": True}
    ref = train(run_cfg(tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "a", steps=6, **extra)))

    cfg = run_cfg(tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "b", steps=6, **extra))
    state = {"step": 0}

    def on_event(e):
        if e.type == "step":
            state["step"] = e.step

    first = train(cfg, on_event=on_event, should_stop=lambda: state["step"] >= 4)
    assert first.status == "stopped" and first.step == 4
    assert not (tmp_path / "b" / "run" / "run.safetensors").exists()
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed" and resumed.step == 6
    _assert_same(_lora_tensors(ref.lora_path), _lora_tensors(resumed.lora_path))
    ended = [e for e in read_events(tmp_path / "b" / "run" / "events.jsonl") if e["type"] == "run_ended"]
    assert [e["status"] for e in ended] == ["stopped", "completed"]


def test_resume_with_changed_settings_warns_and_names_them(tiny_sd1_dir, image_folder, tmp_path):
    base = tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "o", steps=2, **{"train.save_every_steps": 1})
    train(run_cfg(base))
    logs = []
    train(run_cfg(base + ["train.max_steps=3", "train.learning_rate=0.0005"]), on_event=logs.append, resume=True)
    warn = [e.message for e in logs if e.type == "log" and e.level == "warning"]
    assert any("train.max_steps" in w and "train.learning_rate" in w for w in warn), warn


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)


def _write_config(path: Path, overrides: list[str]) -> Path:
    path.write_text(C.config_to_toml(run_cfg(overrides)))
    return path


def _wait_for_event(events: Path, pred, proc, timeout: float = HANG_S) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for e in read_events(events):
            if pred(e):
                return e
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.returncode} {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for event")


def test_sigint_saves_checkpoint_and_exits_zero_then_sigkill_resume_matches(tiny_sd1_dir, image_folder, tmp_path):
    over = tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "o", steps=30, **{"train.save_every_steps": 5})
    ref = train(run_cfg(tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "ref", steps=30,
                                       **{"train.save_every_steps": 5})))
    cfgfile = _write_config(tmp_path / "cfg.toml", over)
    events = tmp_path / "o" / "run" / "events.jsonl"
    # SIGINT: checkpoint, message, exit 0
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(cfgfile)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _wait_for_event(events, lambda e: e["type"] == "step" and e["step"] >= 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, err
    assert "resume with" in err and "Traceback" not in err
    stopped = [e for e in read_events(events) if e["type"] == "run_ended"][-1]
    assert stopped["status"] == "stopped"
    # resume, then SIGKILL right after the next checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(cfgfile), "--resume"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_event(events, lambda e: e["type"] == "checkpoint" and e["step"] >= stopped["step"] + 5, proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    r = _cli(["-m", "trainer", "--config", str(cfgfile), "--resume"], timeout=HANG_S)
    assert r.returncode == 0, r.stderr
    _assert_same(_lora_tensors(ref.lora_path), _lora_tensors(tmp_path / "o" / "run" / "run.safetensors"))


def test_two_processes_with_accelerate_write_one_lora(tiny_sd1_dir, image_folder, tmp_path):
    cfgfile = _write_config(tmp_path / "cfg.toml", tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "o", steps=2,
                                                                   **{"train.batch_size": 1}))
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's CPU multi-process path needs
    # MPI); torchrun with ACCELERATE_USE_CPU=1 gives accelerate two gloo processes (DistributedType.MULTI_CPU).
    import socket
    with socket.socket() as sock:  # a free port for the two processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "trainer", "--config", str(cfgfile)],
                       capture_output=True, text=True, cwd=ROOT, timeout=HANG_S,
                       env=dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / "o" / "run").glob("*.safetensors"))
    assert [f.name for f in files] == ["run.safetensors"]
    events = read_events(tmp_path / "o" / "run" / "events.jsonl")
    ended = [e for e in events if e["type"] == "run_ended"]
    assert len(ended) == 1 and ended[0]["status"] == "completed"
    # each process encoded its share of the six pictures and read the other's from the shared disk cache
    logs = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith("latents:")]
    assert logs == ["latents: 6 encoded by 2 processes (3 + 3), 0 read from the disk cache"], logs


# ------------------------------------------------------------------------------------------------ bad input

def _assert_clean_failure(r: subprocess.CompletedProcess, must_contain: str, out: Path) -> None:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("error: ") and must_contain in lines[-1], r.stderr
    assert not list(out.rglob("*.safetensors")) if out.exists() else True


def test_bad_inputs_fail_with_one_line(tiny_sd1_dir, image_folder, tmp_path):
    out = tmp_path / "o"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    (empty / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a model")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (tiny_overrides(tiny_sd1_dir, tmp_path / "nope", out), "data.dir"),
        (tiny_overrides(tiny_sd1_dir, empty, out), "no usable image"),
        (tiny_overrides(tmp_path / "missing-model", image_folder, out), "missing-model"),
        (tiny_overrides(junk, image_folder, out), "junk.safetensors"),
        (tiny_overrides(tiny_sd1_dir, image_folder, out) + ["lora.rnk=3"], "did you mean 'lora.rank'"),
        (tiny_overrides(tiny_sd1_dir, image_folder, out) + ["train.batch_size=two"], "train.batch_size"),
        (tiny_overrides(tiny_sd1_dir, image_folder, out) + ["train.max_steps=-5"], "train.max_steps"),
        (tiny_overrides(tiny_sd1_dir, image_folder, afile / "sub"), "output.dir"),
    ]
    for overrides, expected in cases:
        args = ["-m", "trainer"] + [a for o in overrides for a in ("--set", o)]
        _assert_clean_failure(_cli(args, timeout=HANG_S), expected, out)


def test_non_finite_loss_stops_names_step_and_keeps_checkpoint(tiny_sd1_dir, image_folder, tmp_path):
    out = tmp_path / "o"
    over = tiny_overrides(tiny_sd1_dir, image_folder, out, steps=40, **{
        "train.learning_rate": 10.0, "train.max_grad_norm": 0.0, "train.save_every_steps": 1,
        "train.keep_checkpoints": 1, "lora.alpha": 64.0})
    r = _cli(["-m", "trainer"] + [a for o in over for a in ("--set", o)], timeout=HANG_S)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "diverged" in line and "at step" in line and "learning_rate" in line
    assert not (out / "run" / "run.safetensors").exists()
    assert list((out / "run" / "checkpoints").glob("step-*"))


def test_cli_train_from_shipped_preset_on_single_file_checkpoint(tiny_sd1_dir, image_folder, tmp_path):
    """The README's first command: a shipped preset, a single-file checkpoint, --set overrides."""
    from trainer.models.ldm_export import save_single_file
    from trainer.models.loading import load_base_model
    ckpt = tmp_path / "v1-5-tiny.safetensors"
    save_single_file(load_base_model(run_cfg([f"model.base={tiny_sd1_dir}"]).model).make_pipeline(), ckpt)
    sets = [f"data.dir={image_folder}", f"model.base={ckpt}", "data.resolution=128", "data.min_bucket_px=64",
            "train.max_steps=2", "train.batch_size=1", "sample.every_steps=0", "train.mixed_precision=no",
            f"output.dir={tmp_path / 'out'}", "output.name=my-style"]
    r = _cli(["-m", "app.cli", "train", "--config", str(ROOT / "presets" / "sd15-style.toml"),
              *[a for s in sets for a in ("--set", s)]], timeout=HANG_S)
    assert r.returncode == 0, r.stderr[-2000:]
    lora = tmp_path / "out" / "my-style" / "my-style.safetensors"
    meta = safe_open(str(lora), "pt").metadata()
    assert meta["ss_sd_model_name"] == "v1-5-tiny.safetensors" and meta["ss_network_dim"] == "16"
    assert "done:" in r.stderr and "Traceback" not in r.stderr


def test_stop_during_setup_ends_at_once_without_files(tiny_sd1_dir, image_folder, tmp_path):
    res = train(run_cfg(tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "o", steps=50)), should_stop=lambda: True)
    assert res.status == "stopped" and res.step == 0
    assert not list((tmp_path / "o").rglob("*.safetensors"))
    assert read_events(res.run_dir / "events.jsonl")[-2]["status"] == "stopped"


@pytest.mark.parametrize("family,clip_skip,dropped", [("sd1", 1, {}), ("sd1", 2, {"lora_te": [2]}),
                                                       ("sdxl", 1, {"lora_te1": [2]}),
                                                       ("sdxl", 2, {"lora_te1": [1, 2]})])
def test_only_text_encoder_layers_that_can_train_are_written(family, clip_skip, dropped, tiny_sd1_dir, tiny_sdxl_dir,
                                                             image_folder, tmp_path):
    """The tiny encoders have 3 layers. SD1 reads hidden_states[-clip_skip], SDXL's first encoder
    hidden_states[-(clip_skip+1)], SDXL's second its final layer too (pooled output): layers after the one read
    get no gradient and would ship as zeros (real ComfyUI showed them). Every module written has learned
    something, the untrainable layers are absent, and the file still loads in diffusers with no complaint."""
    from tests.fixtures.lora_files import captured_logs, load_complaints
    from tests.fixtures.tiny_models import build_tiny_pipeline
    model = tiny_sd1_dir if family == "sd1" else tiny_sdxl_dir
    res = train(run_cfg(tiny_overrides(model, image_folder, tmp_path / "out", steps=2,
                                       **{"model.clip_skip": clip_skip, "lora.text_encoder_targets": "attention"})))
    t = load_file(str(res.lora_path))
    ups = {k: v for k, v in t.items() if k.endswith(".lora_up.weight")}
    assert ups and all(v.abs().max() > 0 for v in ups.values()), [k for k, v in ups.items() if not v.abs().max()]
    for prefix in ("lora_te", "lora_te1", "lora_te2"):
        layers = {int(k.split("_layers_")[1].split("_")[0]) for k in t if k.startswith(prefix + "_text_model")}
        if not layers:
            continue
        assert layers == {0, 1, 2} - set(dropped.get(prefix, [])), (prefix, layers)
    fresh = build_tiny_pipeline(family)
    with captured_logs() as logs:
        fresh.load_lora_weights(str(res.lora_path))
    assert load_complaints(logs) == []
