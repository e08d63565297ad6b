"""The web app's training job: one headless trainer subprocess at a time, its events tailed, Stop/Resume, re-attach.

The GUI never trains in its own process. It writes the resolved config to ``<run>/config.toml`` and starts
``python -m trainer --config <run>/config.toml [--resume] [--overwrite]`` with stdout/stderr going to
``<run>/train.log``. Progress comes from the trainer's ``<run>/events.jsonl`` (read incrementally), so a crash
or an out-of-memory kill never takes the web app down, and Stop is a real signal (SIGINT: the trainer saves a
checkpoint and exits 0). The app makes one ``JobManager`` (``app.ui.state.AppState.jobs``) for all its pages: a
reloaded page, or a second browser tab, sees the same job.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError
from trainer.train.checkpoint import list_checkpoints  # torch-free: the web app must not load torch

#: Steps kept for the loss plot (older points are thinned so a long run stays cheap to draw).
MAX_PLOT_POINTS = 2000
#: Most training processes (GPUs) the Train tab starts on this machine; more than one goes through
#: ``accelerate launch --multi_gpu --num_processes N`` (DDP). Several machines: accelerate's own config (README).
MIN_PROCESSES, MAX_PROCESSES = 1, 16
#: how ``accelerate launch`` is run: its module, with this Python (the same environment as the app)
ACCELERATE_LAUNCH = ("-m", "accelerate.commands.launch")
LOG_TAIL_LINES = 40

_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # where the `trainer` package lives


def read_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> list[str]:
    """The last lines of a text file (reads at most max_bytes from its end); carriage-return bars collapsed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        line = line.rsplit("\r", 1)[-1].rstrip()  # a tqdm line: keep its last state
        if line:
            out.append(line)
    return out[-lines:]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class JobView:
    """What the Train tab shows, as a snapshot (safe to read from any thread)."""
    state: str = "idle"  # idle | starting | running | stopping | completed | stopped | failed
    name: str = ""
    run_dir: str = ""
    message: str = ""
    phase: str = ""
    step: int = 0
    max_steps: int = 0
    start_step: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float = 0.0
    eta_s: float | None = None
    loss_points: list[tuple[int, float]] = field(default_factory=list)
    validation_points: list[tuple[int, float]] = field(default_factory=list)  # the validation curve
    samples: list[tuple[str, str]] = field(default_factory=list)  # (png path, caption)
    log_tail: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    command: str = ""
    returncode: int | None = None
    error: str = ""
    lora_path: str = ""
    checkpoint: str = ""
    version: int = 0

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")


class TrainingJob:
    """One trainer subprocess and what its events.jsonl has said so far."""

    def __init__(self, run_dir: Path, config_path: Path, argv: list[str], display_command: str, resume: bool,
                 cwd: Path, env: dict[str, str]):
        self.run_dir = Path(run_dir)
        self.name = self.run_dir.name
        self.config_path = Path(config_path)
        self.events_path = self.run_dir / "events.jsonl"
        self.log_path = self.run_dir / "train.log"
        self.argv = argv
        self.display_command = display_command
        self.resume = resume
        self.stop_requested = 0
        self.started_at = time.time()
        self.ended_at: float | None = None
        # Events already in the file belong to the earlier session of a resumed run: their steps, samples and
        # checkpoints are history for the plot and gallery, but their run_ended is not this job's end.
        self._launch_offset = self.events_path.stat().st_size if self.events_path.exists() else 0
        self._offset = 0
        self._partial = b""
        self._lock = threading.RLock()
        self.view = JobView(state="starting", name=self.name, run_dir=str(self.run_dir), command=display_command,
                            message="resuming: starting the trainer ..." if resume else "starting the trainer ...")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {display_command}\n")
            log.flush()
            self.proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._ended_event: dict | None = None
        self._version = 1

    # ---- control

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        """First call: SIGINT (the trainer saves a checkpoint at the end of the step and exits). Second: give up."""
        with self._lock:
            if not self.alive():
                return "the trainer has already ended"
            self.stop_requested += 1
            self._version += 1
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                return "the trainer has already ended"
            if self.stop_requested == 1:
                return "stop requested: the trainer saves a checkpoint at the end of this step, then exits"
            return "second stop: the trainer quits now without another checkpoint"

    def kill(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    # ---- reading progress

    def _read_new_events(self) -> list[tuple[int, dict]]:
        """Complete events appended since the last call, each with its byte position."""
        try:
            with open(self.events_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._offset:  # the file was replaced (a fresh run): start over
                    self._offset, self._partial = 0, b""
                f.seek(self._offset)
                data = f.read()
        except OSError:  # not written yet (or unreadable for a moment): try again on the next poll
            return []
        if not data:
            return []
        start = self._offset - len(self._partial)
        self._offset += len(data)
        buf = self._partial + data
        lines = buf.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        out, pos = [], start
        for line in lines:
            here = pos
            pos += len(line) + 1
            if not line.strip():
                continue
            try:
                out.append((here, json.loads(line)))
            except json.JSONDecodeError:
                continue
        return out

    def poll(self) -> JobView:
        """Fold new events and the process state into the view; cheap enough to call every second."""
        with self._lock:
            v = self.view
            changed = False
            for pos, ev in self._read_new_events():
                changed = True
                history = pos < self._launch_offset
                self._apply(v, ev, history)
            rc = self.proc.poll()
            if rc is not None and v.returncode is None:
                for pos, ev in self._read_new_events():  # what it wrote between the read above and its exit
                    self._apply(v, ev, pos < self._launch_offset)
                v.returncode = rc
                self.ended_at = time.time()
                changed = True
                self._finish(v, rc)
            elif rc is None:
                state = "stopping" if self.stop_requested else ("running" if v.state == "running" else "starting")
                if state != v.state:
                    v.state = state
                    changed = True
                if v.state == "stopping":
                    v.message = ("stopping: the trainer saves a checkpoint at the end of this step (once the model "
                                 "is loaded, if it is still loading) ..." if self.stop_requested == 1
                                 else "stopping now ...")
            tail = read_tail(self.log_path)
            if tail != v.log_tail:
                v.log_tail = tail
                changed = True
            if changed:
                self._version += 1
            v.version = self._version
            return _copy_view(v)

    def _apply(self, v: JobView, ev: dict, history: bool) -> None:
        t = ev.get("type")
        if t == "step":
            step, loss = int(ev.get("step", 0)), float(ev.get("loss", 0.0))
            if v.loss_points and step <= v.loss_points[-1][0]:  # a resume replays from its checkpoint
                v.loss_points = [p for p in v.loss_points if p[0] < step]
            v.loss_points.append((step, loss))
            if len(v.loss_points) > MAX_PLOT_POINTS:
                v.loss_points = v.loss_points[::2]
            v.step, v.max_steps = step, int(ev.get("max_steps", v.max_steps))
            if not history:
                v.loss, v.lr = loss, float(ev.get("lr", 0.0))
                v.it_per_s, v.eta_s = float(ev.get("it_per_s", 0.0)), float(ev.get("eta_s", 0.0))
                v.phase = ""
        elif t == "validation":
            step = int(ev.get("step", 0))
            v.validation_points = [p for p in v.validation_points if p[0] < step] + [(step, float(ev.get("loss", 0)))]
        elif t == "sample":
            caption = f"step {ev.get('step', 0)}: {ev.get('prompt', '')}"
            v.samples = [s for s in v.samples if s[0] != ev.get("path")] + [(str(ev.get("path", "")), caption)]
        elif t == "checkpoint":
            v.checkpoint = f"step {ev.get('step', 0)}: {ev.get('lora_path') or ev.get('path', '')}"
        elif history:
            return
        elif t == "phase":
            total = int(ev.get("total", 0))
            v.phase = f"{ev.get('name', '')} {ev.get('done', 0)}/{total}" if total > 1 else str(ev.get("name", ""))
            v.message = v.phase + " ..."
        elif t == "run_started":
            v.state = "stopping" if self.stop_requested else "running"
            v.max_steps = int(ev.get("max_steps", 0))
            v.start_step = int(ev.get("start_step", 0))
            v.step = max(v.step, v.start_step) if ev.get("resumed") else v.start_step
            v.message = (f"resumed at step {v.start_step}" if ev.get("resumed") else "training") \
                + f" on {ev.get('num_images', 0)} images ({ev.get('family', '')})"
        elif t == "log":
            if ev.get("level") == "warning":
                v.warnings = (v.warnings + [str(ev.get("message", ""))])[-10:]
        elif t == "run_ended":
            self._ended_event = ev
            v.lora_path = str(ev.get("lora_path", "") or v.lora_path)

    def _finish(self, v: JobView, rc: int) -> None:
        ended = self._ended_event
        if ended is not None and ended.get("status") in ("completed", "stopped"):
            v.state = ended["status"]
            if v.state == "completed":
                v.message = f"finished at step {ended.get('step', v.step)}: {v.lora_path}"
            else:
                v.message = (f"stopped at step {ended.get('step', v.step)}; a checkpoint was saved. "
                             "Resume continues from it.")
            v.eta_s = None
            return
        v.state = "failed"
        error = str(ended.get("error", "")) if ended else ""
        if not error:
            error = next((ln[len("error: "):] for ln in reversed(read_tail(self.log_path, 200))
                          if ln.startswith("error: ")), "")
        if rc == 2 and error:  # a UserError: bad input, reported in one line
            v.error = error
            v.message = f"the trainer refused to run: {error}"
        elif rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            v.error = error or f"killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
            v.message = f"the trainer crashed (exit code {rc}, {name}); last log lines below"
        else:
            v.error = error or f"exit code {rc}"
            v.message = f"the trainer crashed (exit code {rc}); last log lines below" if rc else \
                "the trainer ended without finishing (see the log)"
        v.eta_s = None


def _copy_view(v: JobView) -> JobView:
    return JobView(**{k: (list(val) if isinstance(val, list) else val) for k, val in v.__dict__.items()})


class JobManager:
    """At most one training job at a time for the whole web app (all sessions)."""

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable
        self._job: TrainingJob | None = None
        self._lock = threading.Lock()
        atexit.register(self.shutdown)

    @property
    def job(self) -> TrainingJob | None:
        return self._job

    def running(self) -> TrainingJob | None:
        j = self._job
        return j if j is not None and j.alive() else None

    def command_for(self, config_path: Path, *, resume: bool = False, overwrite: bool = False, processes: int = 1,
                    port: int | None = None) -> list[str]:
        """``python -m trainer --config ...``; with several processes, the same under ``accelerate launch``
        (``port``: the processes' rendezvous port on this machine; accelerate's default when None)."""
        if not MIN_PROCESSES <= int(processes) <= MAX_PROCESSES:
            raise UserError(f"processes: {processes} is not between {MIN_PROCESSES} and {MAX_PROCESSES}")
        launch: list[str] = []
        if processes > 1:
            launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", str(int(processes))]
            if port is not None:
                launch += ["--main_process_port", str(port)]
        argv = [self.python, *launch, "-m", "trainer", "--config", str(config_path)]
        if resume:
            argv.append("--resume")
        if overwrite:
            argv.append("--overwrite")
        return argv

    @staticmethod
    def display(argv: list[str]) -> str:
        shown = ["python", *argv[1:]] if argv and Path(argv[0]).name.startswith("python") else argv
        if tuple(shown[1:3]) == ACCELERATE_LAUNCH:
            shown = ["accelerate", "launch", *shown[3:]]
        return " ".join(shlex.quote(a) for a in shown)

    def start(self, run_dir: Path, config_text: str, *, resume: bool = False, overwrite: bool = False,
              cwd: Path | None = None, argv: list[str] | None = None, processes: int = 1) -> TrainingJob:
        """Write <run>/config.toml and launch the trainer on it (``processes`` > 1: under accelerate launch, on a
        free local port; Stop's SIGINT goes to the launcher, which passes it to every process).

        UserError (nothing written, nothing started) when a job is already running, when Resume has no
        checkpoint to continue from, or when Start would reuse a run folder that holds checkpoints.
        """
        with self._lock:
            busy = self.running()
            if busy is not None:
                v = busy.poll()
                where = f" (step {v.step}/{v.max_steps})" if v.max_steps else ""
                raise UserError(f"a training job is already running: '{busy.name}'{where}; stop it or wait for it "
                                "to finish before starting another")
            run_dir = Path(run_dir)
            if resume and not list_checkpoints(run_dir):
                raise UserError(f"nothing to resume: {run_dir} has no checkpoint yet; press Start",
                                field="output.name")
            if not resume and list_checkpoints(run_dir) and not overwrite:
                raise UserError(f"output.name: {run_dir} already holds a run with checkpoints; press Resume to "
                                "continue it, tick 'overwrite' to start over, or choose another output.name",
                                field="output.name")
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                config_path = run_dir / "config.toml"
                tmp = run_dir / "config.toml.tmp"
                tmp.write_text(config_text, encoding="utf-8")
                tmp.replace(config_path)
            except OSError as e:
                raise UserError(f"output.dir: cannot write to {run_dir}: {e.strerror or e}", field="output.dir") \
                    from None
            if not resume:
                (run_dir / "events.jsonl").unlink(missing_ok=True)  # the trainer does the same; no stale events
            argv = argv or self.command_for(config_path, resume=resume, overwrite=overwrite, processes=processes,
                                            port=_free_port() if processes > 1 else None)
            self._job = TrainingJob(run_dir, config_path, argv, self.display(argv), resume,
                                    Path(cwd) if cwd else Path.cwd(), _child_env())
            return self._job

    def stop(self) -> str:
        job = self.running()
        if job is None:
            raise UserError("no training job is running")
        return job.stop()

    def view(self) -> JobView:
        j = self._job
        return j.poll() if j is not None else JobView()

    def shutdown(self) -> None:
        """The web app is closing: a running trainer saves a checkpoint and stops (resumable later)."""
        j = self.running()
        if j is not None:
            j.kill(timeout=60)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env["LORASTUDIO_NO_BAR"] = "1"  # one line per message in train.log instead of redrawn bars
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return env
