"""The web app's training job manager, against a fake trainer (fast): one job at a time, stop, resume, crashes."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.ui.jobs import JobManager, read_tail
from trainer.train.checkpoint import list_checkpoints
from trainer.errors import UserError
from tests.fixtures.waits import HANG_S

# A stand-in for `python -m trainer`: the same events.jsonl, signals and exit codes, no torch.
FAKE = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path
    run = Path(sys.argv[1]); mode = sys.argv[2]; resume = "--resume" in sys.argv
    ev = open(run / "events.jsonl", "a")
    def emit(**e):
        e.setdefault("time", time.time()); ev.write(json.dumps(e) + "\\n"); ev.flush()
    stop = {"n": 0}
    def on_signal(s, f):
        stop["n"] += 1
        if stop["n"] > 1:
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_signal)
    print("fake trainer starting", flush=True)
    if mode == "usererror":
        print("error: data.dir: folder not found: /nowhere", file=sys.stderr); sys.exit(2)
    start = 0
    if resume:
        start = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    emit(type="phase", name="loading model", done=0, total=1)
    emit(type="run_started", run_dir=str(run), max_steps=20, start_step=start, resumed=resume, num_images=3,
         family="sd1")
    if resume:
        emit(type="log", level="info", message=f"resumed from step {start}")
    for step in range(start + 1, 21):
        if stop["n"]:
            ck = run / "checkpoints" / f"step-{step - 1:08d}"; ck.mkdir(parents=True, exist_ok=True)
            (ck / "state.json").write_text("{}"); (ck / "lora_state.safetensors").write_bytes(b"")
            emit(type="checkpoint", step=step - 1, path=str(ck), lora_path="")
            emit(type="run_ended", status="stopped", step=step - 1); print("stopped", flush=True); sys.exit(0)
        time.sleep(0.05 if mode != "slow" else 0.3)
        emit(type="step", step=step, max_steps=20, loss=1.0 / step, lr=1e-4, it_per_s=20.0, eta_s=(20 - step) / 20)
        if step == 3 and mode == "crash":
            raise RuntimeError("CUDA out of memory (pretend)")
        if step == 4:
            emit(type="sample", step=4, path=str(run / "s.png"), prompt="zxq")
    emit(type="run_ended", status="completed", step=20, lora_path=str(run / "x.safetensors"))
''')


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE)
    return script


def start(jm: JobManager, fake: Path, run: Path, mode: str, **kw):
    argv = [sys.executable, str(fake), str(run), mode] + (["--resume"] if kw.get("resume") else [])
    return jm.start(run, "preset_version = 1\n", argv=argv, cwd=run.parent, **kw)


def wait_for(jm: JobManager, cond, timeout: float = HANG_S):
    end = time.time() + timeout
    while time.time() < end:
        v = jm.view()
        if cond(v):
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out; last view: {jm.view()}")


def test_one_job_at_a_time_stop_and_resume(tmp_path, fake):
    jm = JobManager()
    run = tmp_path / "outputs" / "r1"
    job = start(jm, fake, run, "slow")
    assert (run / "config.toml").read_text() == "preset_version = 1\n"
    v = wait_for(jm, lambda v: v.state == "running" and v.step >= 1)
    assert v.max_steps == 20 and v.eta_s is not None and v.loss_points
    with pytest.raises(UserError, match="already running: 'r1'"):
        start(jm, fake, tmp_path / "outputs" / "r2", "ok")
    assert not (tmp_path / "outputs" / "r2").exists()  # refused before anything was written

    assert "saves a checkpoint" in jm.stop()
    v = wait_for(jm, lambda v: v.state == "stopped")
    assert v.returncode == 0 and "checkpoint was saved" in v.message and v.checkpoint.startswith("step ")
    stopped_at = v.step
    assert list_checkpoints(run)
    assert "fake trainer starting" in "\n".join(v.log_tail)
    with pytest.raises(UserError, match="no training job is running"):
        jm.stop()

    # Start again on the same run folder would throw its checkpoints away: refused unless overwrite
    with pytest.raises(UserError, match="already holds a run with checkpoints") as e:
        start(jm, fake, run, "ok")
    assert e.value.field == "output.name"

    start(jm, fake, run, "ok", resume=True)
    v = wait_for(jm, lambda v: v.state == "completed")
    assert v.step == 20 and v.lora_path.endswith("x.safetensors")
    steps = [s for s, _ in v.loss_points]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 20  # history + resumed steps, one curve
    assert v.samples and v.samples[0][1] == "step 4: zxq"
    assert "resumed" not in v.state and job is not jm.job
    assert read_tail(run / "train.log", 200).count("fake trainer starting") == 2  # one log, both sessions


def test_resume_needs_a_checkpoint(tmp_path, fake):
    jm = JobManager()
    with pytest.raises(UserError, match="nothing to resume"):
        start(jm, fake, tmp_path / "empty", "ok", resume=True)


def test_crash_shows_exit_code_and_last_log_lines(tmp_path, fake):
    jm = JobManager()
    start(jm, fake, tmp_path / "c", "crash")
    v = wait_for(jm, lambda v: v.state == "failed")
    assert v.returncode == 1
    assert "crashed (exit code 1)" in v.message
    assert any("CUDA out of memory (pretend)" in line for line in v.log_tail)
    # the manager keeps working: the next job starts
    start(jm, fake, tmp_path / "d", "ok")
    assert wait_for(jm, lambda v: v.state == "completed").step == 20


def test_refusal_by_the_trainer_is_one_line(tmp_path, fake):
    jm = JobManager()
    start(jm, fake, tmp_path / "u", "usererror")
    v = wait_for(jm, lambda v: v.state == "failed")
    assert v.returncode == 2
    assert v.error == "data.dir: folder not found: /nowhere"
    assert v.message == "the trainer refused to run: data.dir: folder not found: /nowhere"


def test_killed_trainer_is_reported(tmp_path, fake):
    jm = JobManager()
    job = start(jm, fake, tmp_path / "k", "slow")
    wait_for(jm, lambda v: v.step >= 1)
    job.proc.send_signal(signal.SIGKILL)
    v = wait_for(jm, lambda v: v.state == "failed")
    assert v.returncode == -9 and "SIGKILL" in v.message and "out of memory?" in v.error


def test_events_are_read_incrementally_and_half_lines_wait(tmp_path):
    from app.ui.jobs import TrainingJob
    run = tmp_path / "run"
    run.mkdir()
    job = TrainingJob(run, run / "config.toml", [sys.executable, "-c", "import time; time.sleep(5)"], "x", False,
                      tmp_path, {})
    try:
        line = json.dumps({"type": "step", "step": 1, "max_steps": 5, "loss": 0.5})
        with open(run / "events.jsonl", "w") as f:
            f.write(json.dumps({"type": "run_started", "max_steps": 5, "start_step": 0}) + "\n")
            f.write(line[:10])
            f.flush()
            v = job.poll()
            assert v.state == "running" and v.step == 0  # half a line is not an event yet
            f.write(line[10:] + "\n")
        v = job.poll()
        assert v.step == 1 and v.loss == 0.5 and v.state == "running"
        v2 = job.poll()
        assert v2.version == v.version  # nothing new: the page skips its update
    finally:
        job.kill(timeout=5)


def test_closing_the_app_stops_the_trainer_with_a_checkpoint(tmp_path, fake):
    jm = JobManager()
    run = tmp_path / "s"
    start(jm, fake, run, "slow")
    wait_for(jm, lambda v: v.step >= 1)
    jm.shutdown()  # what atexit runs when `lorastudio ui` is closed (Ctrl-C or kill)
    v = jm.view()
    assert v.state == "stopped" and list_checkpoints(run)


def test_validation_points_become_a_second_line_of_the_loss_plot(tmp_path):
    from app.ui.jobs import TrainingJob
    from app.ui.tabs.train import loss_frame
    run = tmp_path / "run"
    run.mkdir()
    job = TrainingJob(run, run / "config.toml", [sys.executable, "-c", "import time; time.sleep(5)"], "x", False,
                      tmp_path, {})
    try:
        with open(run / "events.jsonl", "w") as f:
            f.write(json.dumps({"type": "run_started", "max_steps": 4, "start_step": 0}) + "\n")
            for s in (1, 2):
                f.write(json.dumps({"type": "step", "step": s, "max_steps": 4, "loss": 0.5 / s}) + "\n")
            f.write(json.dumps({"type": "validation", "step": 2, "loss": 0.3, "best": 0.3}) + "\n")
        v = job.poll()
        assert v.validation_points == [(2, 0.3)]
        frame = loss_frame(v)
        assert sorted(set(frame["series"])) == ["train", "validation"]
        assert frame[frame["series"] == "validation"]["loss"].tolist() == [0.3]
    finally:
        job.kill(timeout=5)
