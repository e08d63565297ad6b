"""Typed training events, the events.jsonl writer and the terminal progress bar (the loop knows neither)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Event:
    type: str = ""
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunStarted(Event):
    type: str = "run_started"
    run_dir: str = ""
    max_steps: int = 0
    start_step: int = 0
    resumed: bool = False
    num_images: int = 0
    family: str = ""
    command: str = ""


@dataclass
class Log(Event):
    type: str = "log"
    level: str = "info"  # info | warning
    message: str = ""


@dataclass
class Phase(Event):
    """Set-up work before the first step (loading, caching), with its own progress."""
    type: str = "phase"
    name: str = ""
    done: int = 0
    total: int = 0


@dataclass
class Step(Event):
    type: str = "step"
    step: int = 0
    max_steps: int = 0
    loss: float = 0.0
    lr: float = 0.0
    it_per_s: float = 0.0
    eta_s: float = 0.0
    epoch: int = 0


@dataclass
class Sample(Event):
    type: str = "sample"
    step: int = 0
    path: str = ""
    prompt: str = ""


@dataclass
class Checkpoint(Event):
    type: str = "checkpoint"
    step: int = 0
    path: str = ""
    lora_path: str = ""


@dataclass
class Validation(Event):
    """The validation loss at a step (fixed noise and timesteps, so the points of one run compare)."""
    type: str = "validation"
    step: int = 0
    loss: float = 0.0
    best: float = 0.0


@dataclass
class RunEnded(Event):
    type: str = "run_ended"
    status: str = "completed"  # completed | stopped | failed
    step: int = 0
    lora_path: str = ""
    error: str = ""


EVENT_TYPES = {c.type: c for c in (RunStarted, Log, Phase, Step, Sample, Checkpoint, Validation, RunEnded)}


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of a run (a half-written last line is ignored)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return out


class JsonlSink:
    """Appends each event as one JSON line and flushes, so a GUI tailing the file sees it at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        self._f.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ProgressBar:
    """A tqdm bar on stderr driven by events; warnings and milestones printed above it."""

    def __init__(self, stream=None, disable: bool | None = None):
        self.stream = stream or sys.stderr
        self.disable = disable if disable is not None else os.environ.get("LORASTUDIO_NO_BAR") == "1"
        self._bar = None
        self._phase = None

    def _write(self, text: str) -> None:
        from tqdm import tqdm
        tqdm.write(text, file=self.stream)

    def __call__(self, event: Event) -> None:
        from tqdm import tqdm
        if isinstance(event, Phase):
            if self.disable:
                return
            if self._phase is None or self._phase.desc != event.name:
                if self._phase is not None:
                    self._phase.close()
                self._phase = tqdm(total=event.total, desc=event.name, file=self.stream, leave=False,
                                   dynamic_ncols=True)
            self._phase.n = event.done
            self._phase.refresh()
            if event.done >= event.total:
                self._phase.close()
                self._phase = None
        elif isinstance(event, RunStarted):
            what = "resuming" if event.resumed else "training"
            self._write(f"{what} {event.family} LoRA on {event.num_images} images -> {event.run_dir}")
            if not self.disable:
                self._bar = tqdm(total=event.max_steps, initial=event.start_step, desc="train", unit="step",
                                 file=self.stream, dynamic_ncols=True)
        elif isinstance(event, Step):
            if self._bar is not None:
                self._bar.n = event.step
                self._bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
                self._bar.refresh()
        elif isinstance(event, Log):
            self._write(("warning: " if event.level == "warning" else "") + event.message)
        elif isinstance(event, Sample):
            self._write(f"sample saved: {event.path}")
        elif isinstance(event, Checkpoint):
            self._write(f"checkpoint saved at step {event.step}: {event.path}")
        elif isinstance(event, Validation):
            self._write(f"validation loss at step {event.step}: {event.loss:.5f} (best {event.best:.5f})")
        elif isinstance(event, RunEnded):
            if self._phase is not None:
                self._phase.close()
                self._phase = None
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if event.status == "completed":
                self._write(f"done: {event.lora_path}")
            elif event.status == "stopped":
                self._write(f"stopped at step {event.step}; checkpoint saved. Continue with --resume.")


def fan_out(*sinks: Callable[[Event], None] | None) -> Callable[[Event], None]:
    live = [s for s in sinks if s is not None]

    def emit(event: Event) -> None:
        for s in live:
            s(event)
    return emit
