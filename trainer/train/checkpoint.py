"""Resumable checkpoints: LoRA weights, optimizer, schedule, RNG states and data position, written atomically."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # list_checkpoints/latest_checkpoint stay torch-free for the GUI
    import torch

CHECKPOINT_DIR = "checkpoints"


def trainable_state(modules: dict[str, "torch.nn.Module"]) -> dict[str, "torch.Tensor"]:
    """The trainable (LoRA) parameters of each component, by 'component/param name'."""
    out = {}
    for comp, m in modules.items():
        for name, p in m.named_parameters():
            if p.requires_grad:
                out[f"{comp}/{name}"] = p.detach().cpu().contiguous().clone()
    return out


def load_trainable_state(modules: dict[str, "torch.nn.Module"], state: dict[str, "torch.Tensor"]) -> None:
    import torch
    params = {f"{comp}/{n}": p for comp, m in modules.items() for n, p in m.named_parameters() if p.requires_grad}
    missing = set(params) - set(state)
    unexpected = set(state) - set(params)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit this model: {len(missing)} missing, {len(unexpected)} "
                           f"unexpected LoRA tensors (e.g. {sorted(missing or unexpected)[:2]})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.device, p.dtype))


def save_checkpoint(run_dir: Path, step: int, *, modules, optimizer, scheduler, data_pos: dict,
                    config_toml: str, keep: int, extra: dict[str, dict] | None = None) -> Path:
    """Write checkpoints/step-XXXXXXXX atomically (temp folder, then rename) and prune old ones.

    ``extra``: more named tensor sets of the run's state (e.g. the EMA), each written as <name>.safetensors
    and given back by load_checkpoint under state["extra"][name]."""
    import torch
    from safetensors.torch import save_file

    from trainer.train.optim import optimizer_state_to_tensors
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(modules), str(tmp / "lora_state.safetensors"))
    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"meta": opt_meta})
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    for name, tensors in (extra or {}).items():
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    state = {
        "step": step,
        "time": time.time(),
        "data": data_pos,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "python_random": _py_random_state(),
        "numpy_random": _np_random_state(),
        "extra": sorted(extra or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    good = [p for p in root.glob("step-*") if (p / "state.json").is_file() and (p / "lora_state.safetensors").is_file()]
    return sorted(good, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def load_checkpoint(path: Path, *, modules, optimizer, scheduler) -> dict[str, Any]:
    """Restore everything into the live objects; returns state.json (step, data position)."""
    import torch
    from safetensors.torch import load_file

    from trainer.train.optim import tensors_to_optimizer_state
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    load_trainable_state(modules, load_file(str(path / "lora_state.safetensors")))
    from safetensors import safe_open
    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        meta = f.metadata()["meta"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    optimizer.load_state_dict(tensors_to_optimizer_state(tensors, meta))
    sch = scheduler.state_dict()
    sch.update(state["scheduler"])
    scheduler.load_state_dict(sch)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    _set_py_random_state(state["python_random"])
    _set_np_random_state(state["numpy_random"])
    state["extra"] = {name: load_file(str(path / f"{name}.safetensors")) for name in state.get("extra", [])}
    return state


def _py_random_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def _set_py_random_state(s):
    random.setstate((s[0], tuple(s[1]), s[2]))


def _np_random_state():
    import numpy as np
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_np_random_state(s):
    import numpy as np
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
