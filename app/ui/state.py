"""What the web app knows between events, in one object made by ``launch``/``build_app`` and handed to every tab.

No module-level mutable state: two apps built in one process (tests, or a reload in a notebook) never see each
other's folders, demo, loaded model or training job. ``AppState`` holds where the app reads and writes (its root
folder and the served folders under it), the dataset folders the user picked, the demo's status, the one
long-lived image ``Generator`` (``GenerationSession``) and the one training-job manager. Importing this module
does not import gradio or torch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.common.names import looks_like_hub_id
from trainer.errors import UserError, first_line

from app.ui.jobs import JobManager

log = logging.getLogger("lorastudio.ui")

WORK_DIR_NAME = ".lorastudio-ui"
#: where the Tools tab writes by default, under <root>/outputs: LoRA files, and baked checkpoints (not LoRAs)
TOOLS_DIR_NAME = "lora-tools"
BAKED_DIR_NAME = "baked"


def rel(path: str | Path, base: Path) -> str:
    """A path shown relative to `base` when it is inside it."""
    try:
        return Path(path).resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path)


@dataclass
class DemoState:
    """The first-run demo: none | building | ready | failed, with what it made (``app.demo.DemoInfo``)."""
    status: str = "none"
    info: Any = None
    message: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


class GenerationSession:
    """One base model and one Generator kept alive between generations (LoRA weights change, files are not re-read)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.generator = None
        self.loads = 0
        self.load_s = 0.0

    def get(self, base: str, progress=None, lora_dir: str | None = None):
        """The Generator for this base model, loading it only when the model changed; (generator, note)."""
        gen, note = self._get(base, progress)
        d = Path(lora_dir).expanduser() if lora_dir and str(lora_dir).strip() else None
        gen.lora_dir = d if d is not None and d.is_dir() else None  # where <lora:name> prompt tags are looked up
        return gen, note

    def _get(self, base: str, progress=None):
        base = (base or "").strip()
        if not base:
            raise UserError("choose a base model first (a diffusers folder, a .safetensors checkpoint or a hub id)",
                            field="model.base")
        path = Path(base).expanduser()
        source = str(path.resolve()) if path.exists() else base
        if not path.exists() and not looks_like_hub_id(base):
            raise UserError(f"base model not found: {base}", field="model.base")
        key = (source,)
        if self.key == key and self.generator is not None:
            return self.generator, f"base model reused (loaded once, {self.load_s:.1f} s)"
        if progress is not None:
            progress(0.0, desc="loading the base model (first use) ...")
        t0 = time.perf_counter()
        import torch

        from app.cli.generate import _quiet_loading
        from trainer.config import ModelConfig
        from trainer.generate.engine import Generator
        from trainer.models.loading import load_base_model
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        _quiet_loading()
        self.generator = None  # drop the old model before loading the next
        self.key = None
        base_model = load_base_model(ModelConfig(base=source), dtype=dtype, device=device)
        self.generator = Generator(base_model)
        self.key = key
        self.loads += 1
        self.load_s = time.perf_counter() - t0
        return self.generator, f"base model loaded in {self.load_s:.1f} s"


class AppState:
    """Where the app reads and writes; the folders it may serve; the folders the user picked; demo, model, job."""

    def __init__(self, root: str | Path, *, demo_requested: bool = False, jobs: JobManager | None = None):
        self.root = Path(root).resolve()
        self.demo_requested = demo_requested
        self.work = self.root / WORK_DIR_NAME
        self.outputs = self.root / "outputs"
        for d in (self.work, self.outputs, self.work / "thumbs", self.work / "preview", self.work / "exports",
                  self.work / "reports"):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self.chosen = [f for f in json.loads((self.work / "folders.json").read_text(encoding="utf-8"))
                           if isinstance(f, str)]
        except (OSError, ValueError):
            self.chosen = []
        self.demo = DemoState()
        from app.demo import DEMO_STYLES, load_demo_info
        self.demo_style = DEMO_STYLES[0]  # what the demo picker shows first (`lorastudio ui --demo-style`)
        self.gen = GenerationSession()
        self.jobs = jobs if jobs is not None else JobManager()
        info = load_demo_info(self.root)
        if info is not None:
            self.demo.status, self.demo.info = "ready", info
            if info.style in DEMO_STYLES:
                self.demo_style = info.style

    # ---- folders

    @property
    def default_lora_dir(self) -> Path:
        return self.root / "loras"

    @property
    def tools_out(self) -> Path:
        """The Tools tab's LoRA files (listed with the runs' LoRAs)."""
        return self.outputs / TOOLS_DIR_NAME

    @property
    def baked_out(self) -> Path:
        """The Tools tab's baked checkpoints (listed with the base models, not the LoRAs)."""
        return self.outputs / BAKED_DIR_NAME

    def remember_folder(self, folder: str) -> None:
        folder = str(Path(folder).resolve())
        self.chosen = [folder] + [f for f in self.chosen if f != folder][:19]
        try:
            (self.work / "folders.json").write_text(json.dumps(self.chosen, indent=1), encoding="utf-8")
        except OSError:
            pass

    def served_paths(self) -> list[str]:
        """Folders gradio may serve files from (launch's allowed_paths)."""
        return [str(self.outputs), str(self.work), str(self.root / "demo")]

    def preset_roots(self) -> list[Path]:
        """Where paths inside an imported preset may point: this app's folders and the ones the user picked."""
        from app.demo import TOYWORLD_MODEL
        return [self.root, TOYWORLD_MODEL, *map(Path, self.chosen)]

    # ---- what the pickers offer

    def model_choices(self) -> list[str]:
        """Base models the app knows of: the demo model and model folders/files under <root>/models."""
        out = []
        if self.demo.info is not None:
            out.append(self.demo.info.model)
        models = self.root / "models"
        if models.is_dir():
            for p in sorted(models.iterdir()):
                if (p / "model_index.json").is_file() or p.suffix in (".safetensors", ".ckpt"):
                    out.append(str(p))
        if self.baked_out.is_dir():
            out += [str(p) for p in sorted(self.baked_out.iterdir())
                    if p.suffix == ".safetensors" or (p / "model_index.json").is_file()]
        return out

    def preset_choices(self) -> list[tuple[str, str]]:
        """The Train tab's picker: presets, then the settings of earlier runs."""
        from trainer.config.presets import list_presets
        out = [(f"{p.name} ({p.source}): {p.summary[:70]}", f"preset:{p.name}") for p in list_presets()]
        if self.outputs.is_dir():
            for d in sorted(self.outputs.iterdir()):
                if (d / "config.toml").is_file():
                    out.append((f"run {d.name}: its settings", f"run:{d.name}"))
        return out

    @staticmethod
    def preset_names() -> list[str]:
        from trainer.config.presets import list_presets
        seen, out = set(), []
        for p in reversed(list_presets()):  # a user preset shadows a shipped one of the same name
            if p.name not in seen:
                seen.add(p.name)
                out.append(p.name)
        return sorted(out)

    def lora_choices(self, lora_dir: str) -> list[tuple[str, str]]:
        """LoRA files in the runs folder (final and intermediate saves) and in the LoRA folder."""
        seen, out = set(), []
        for f in sorted(self.outputs.rglob("*.safetensors")):
            parts = f.relative_to(self.outputs).parts
            if "checkpoints" in parts or f.name.startswith("pytorch_lora_weights") or parts[0] in (
                    "generated", BAKED_DIR_NAME):
                continue
            out.append((f"outputs/{f.relative_to(self.outputs).as_posix()}", str(f)))
            seen.add(str(f.resolve()))
        d = Path(lora_dir).expanduser() if lora_dir else None
        if d is not None and d.is_dir():
            from trainer.generate.engine import list_loras
            for item in list_loras(d):
                if str(Path(item["path"]).resolve()) not in seen:
                    label = rel(item["path"], d.resolve()) + (f" ({item['alias']})" if item["alias"] else "")
                    out.append((label, item["path"]))
        return out

    # ---- the demo

    def build_demo(self, progress_cb=None, style: str | None = None) -> bool:
        """Create the demo (model, pictures in ``style``, preset) once per style; safe from a thread and a button.
        False: it existed in that style. ``style`` None: the style made last, else the first of DEMO_STYLES."""
        from app.demo import DEMO_STYLES, check_style, create_demo
        with self.demo.lock:
            current = self.demo.info.style if self.demo.info is not None else None
            style = check_style(style or current or DEMO_STYLES[0])
            if self.demo.status == "ready" and current == style:
                return False
            if self.demo.status == "building":
                raise UserError("the demo is being created already; wait for the banner to say it is ready")
            self.demo.status, self.demo.message = "building", ""

        def say(text: str) -> None:
            self.demo.message = text
            if progress_cb is not None:
                progress_cb(text)
        try:
            info = create_demo(self.root, style=style, progress=say)
        except Exception as e:  # noqa: BLE001 - shown in the banner
            log.exception("demo creation failed")
            self.demo.status, self.demo.message = "failed", first_line(e)
            raise
        self.remember_folder(info.images)
        self.demo_style = style
        self.demo.status, self.demo.info, self.demo.message = "ready", info, ""
        return True
