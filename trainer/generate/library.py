"""Where LoRA files are found: a run's intermediate saves (``list_lora_saves``), a name looked up in a LoRA folder
by file name or ``ss_output_name`` (``resolve_lora``/``find_lora``), and folder listings for menus.

Only headers are read (no torch), so the CLI and the web app can list and check files before any model loads.
``trainer.generate.engine`` re-exports these names.
"""

from __future__ import annotations

import re
from pathlib import Path

from trainer.common.safetensors_header import read_metadata
from trainer.errors import UserError


def _checkpoint_label(f: Path) -> str:
    m = re.search(r"(?:step|-)0*(\d+)$", f.stem)
    return f"step {m.group(1)}" if m else f"{f.stem} (final)"


def list_lora_saves(run_dir: str | Path) -> list[Path]:
    """The LoRA files of a training run, oldest first: `<name>-step<N>.safetensors` (or `<name>-<N>`) by step,
    then the final `<name>.safetensors`. diffusers copies (`pytorch_lora_weights*`) are left out."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"checkpoints: {run} is not a folder", path=str(run))
    stepped, final = [], []
    for f in sorted(run.glob("*.safetensors")):
        if f.name.startswith("pytorch_lora_weights"):
            continue
        m = re.search(r"(?:-step|-)0*(\d+)$", f.stem)
        (stepped.append((int(m.group(1)), f.name, f)) if m else final.append(f))
    files = [f for _, _, f in sorted(stepped)] + final
    if not files:
        raise UserError(f"checkpoints: no .safetensors LoRA files in {run}", path=str(run))
    return files


def resolve_lora(name: str, lora_dir: str | Path | None = None) -> Path:
    """A LoRA path: an existing file, else a file in the LoRA folder by name, stem, or `ss_output_name`."""
    p = Path(name).expanduser()
    if p.is_file():
        return p.resolve()
    if lora_dir is not None:
        lora_dir = Path(lora_dir)
        if (lora_dir / name).is_file():
            return (lora_dir / name).resolve()
        found = find_lora(lora_dir, p.stem if p.suffix.lower() == ".safetensors" else name)
        if found is not None:
            return found.resolve()
        if p.suffix.lower() != ".safetensors" and p.parent == Path("."):
            raise UserError(f"LoRA '{name}' is not in the LoRA folder {lora_dir} (looked for {name}.safetensors "
                            f"and ss_output_name '{name}')", path=name)
        raise UserError(f"LoRA file not found: {name} (nor in the LoRA folder {lora_dir})", path=name)
    raise UserError(f"LoRA file not found: {name}", path=name)


def find_lora(lora_dir: str | Path, name: str) -> Path | None:
    """A LoRA in a folder (searched recursively) by file stem, or else by its `ss_output_name` metadata."""
    root = Path(lora_dir)
    if not root.is_dir():
        raise UserError(f"LoRA folder {root} does not exist", path=str(root))
    files = sorted(root.rglob("*.safetensors"))
    for f in files:
        if f.stem == name:
            return f
    for f in files:
        if f.stem.lower() == name.lower():
            return f
    for f in files:
        if _lora_metadata(f).get("ss_output_name") == name:
            return f
    return None


def _lora_metadata(path: Path) -> dict:
    """A listed file's metadata; {} for a file that is not readable (listings skip nothing, show what they can)."""
    try:
        return read_metadata(path)
    except UserError:
        return {}


def list_loras(lora_dir: str | Path) -> list[dict]:
    """Every `.safetensors` under a folder with its name and alias (`ss_output_name`), for menus."""
    root = Path(lora_dir)
    if not root.is_dir():
        return []
    return [{"name": f.stem, "alias": _lora_metadata(f).get("ss_output_name", ""), "path": str(f)}
            for f in sorted(root.rglob("*.safetensors"))]
