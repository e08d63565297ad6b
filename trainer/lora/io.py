"""LoRA files in one import: what we write and what we read (docs/lora-format.md).

The work lives in four modules, each with one job:

* :mod:`trainer.lora.form`     the internal form every file is read into, and the file hash
* :mod:`trainer.lora.reader`   every common layout (kohya, LyCORIS LoCon, PEFT/diffusers, ComfyUI) into that form
* :mod:`trainer.lora.match`    a read file's modules onto a loaded model's layers
* :mod:`trainer.lora.writer`   a trained adapter as a kohya file (self-checked) or diffusers' file
* :mod:`trainer.lora.metadata` the ``ss_*``/``modelspec.*`` keys from the config and one RunStats
"""

from __future__ import annotations

from trainer.lora.form import FAMILY_LABELS, SAVE_DTYPES, LoraFile, LoraModule, SavedLora, lora_addnet_hash
from trainer.lora.match import match_modules
from trainer.lora.metadata import ARCHITECTURES, IMPLEMENTATIONS, RunStats, build_metadata
from trainer.lora.reader import read_lora
from trainer.lora.writer import kohya_module_name, kohya_state_dict, save_diffusers_lora, save_lora

__all__ = ["ARCHITECTURES", "FAMILY_LABELS", "IMPLEMENTATIONS", "SAVE_DTYPES", "LoraFile", "LoraModule", "RunStats",
           "SavedLora", "build_metadata", "kohya_module_name", "kohya_state_dict", "lora_addnet_hash",
           "match_modules", "read_lora", "save_diffusers_lora", "save_lora"]
