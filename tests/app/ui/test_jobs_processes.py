"""The Train tab's processes field: more than one starts the trainer under ``accelerate launch`` (shown as that
command), and Stop / Resume work as with one process (two CPU processes here)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.ui.jobs import MAX_PROCESSES, JobManager
from trainer import config as C
from trainer.errors import UserError
from trainer.train.checkpoint import list_checkpoints

from tests.fixtures.runs import tiny_overrides
from tests.fixtures.waits import HANG_S

ROOT = Path(__file__).resolve().parents[3]


def _wait(jm: JobManager, cond, timeout: float = HANG_S):
    end = time.time() + timeout
    while time.time() < end:
        v = jm.view()
        if cond(v):
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out; last view: {jm.view()}")


def test_command_for_several_processes_is_accelerate_launch(tmp_path):
    jm = JobManager()
    cfg = tmp_path / "run" / "config.toml"
    assert jm.display(jm.command_for(cfg)) == f"python -m trainer --config {cfg}"
    assert jm.display(jm.command_for(cfg, processes=4, resume=True)) == \
        f"accelerate launch --multi_gpu --num_processes 4 -m trainer --config {cfg} --resume"
    with pytest.raises(UserError, match="processes"):
        jm.command_for(cfg, processes=MAX_PROCESSES + 1)


def test_two_processes_start_stop_and_resume(tiny_sd1_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two small processes on a small machine
    # without a GPU, accelerate makes the two processes one gloo group only when told to use the CPU (on GPUs the
    # same command needs nothing more); the trainer's environment is the app's
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "out", steps=40, **{
        "data.resolution": 64, "data.max_bucket_px": 128, "train.batch_size": 1, "lora.train_text_encoder": False}))
    text = C.config_to_toml(cfg)
    jm = JobManager()
    job = jm.start(cfg.run_dir, text, processes=2, cwd=ROOT)
    assert job.display_command.startswith("accelerate launch --multi_gpu --num_processes 2 --main_process_port ")
    assert job.display_command.endswith(f"-m trainer --config {cfg.run_dir / 'config.toml'}")
    v = _wait(jm, lambda v: v.step >= 2 or not v.active)
    assert v.state == "running", "\n".join(v.log_tail)
    assert "saves a checkpoint" in jm.stop()
    v = _wait(jm, lambda v: not v.active)
    # the launcher passes SIGINT to both processes, which save one checkpoint at the same step (the launcher
    # itself then exits 130, torch's elastic agent's code for a forwarded signal)
    assert v.state == "stopped" and "checkpoint was saved" in v.message, "\n".join(v.log_tail)
    assert list_checkpoints(cfg.run_dir) and v.step < 40
    jm.start(cfg.run_dir, text, resume=True, processes=2, cwd=ROOT)
    v = _wait(jm, lambda v: not v.active)
    assert v.state == "completed" and v.step == 40, "\n".join(v.log_tail)
    assert v.command.startswith("accelerate launch --multi_gpu --num_processes 2 ") and v.command.endswith("--resume")
    assert (cfg.run_dir / "run.safetensors").is_file() and v.lora_path.endswith("run.safetensors")


def test_train_tab_starts_the_number_of_processes_in_its_box_and_shows_the_command(tiny_sd1_dir, image_folder,
                                                                                   tmp_path):
    from types import SimpleNamespace

    from app.ui.form import config_to_form
    from app.ui.tabs.train import start_or_resume

    class Recording(JobManager):
        def start(self, run_dir, config_text, **kw):
            self.kw = kw
            argv = self.command_for(Path(run_dir) / "config.toml", processes=kw["processes"], port=29501)
            return SimpleNamespace(name=Path(run_dir).name, display_command=self.display(argv))

    jm = Recording()
    state = SimpleNamespace(jobs=jm, root=tmp_path)
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "out"))
    msg = start_or_resume(state, False, False, config_to_form(cfg), 2)[-1]
    assert jm.kw["processes"] == 2
    assert "`accelerate launch --multi_gpu --num_processes 2 --main_process_port 29501 -m trainer --config " \
        in msg["value"]
    for bad in (0, 2.5, None, MAX_PROCESSES + 1):
        msg = start_or_resume(state, False, False, config_to_form(cfg), bad)[-1]
        assert "processes (GPUs)" in msg["value"] and "\n" not in msg["value"]
