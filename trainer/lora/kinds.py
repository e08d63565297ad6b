"""The adapter types, torch-free: what ``lora.type`` trains and which tensor forms a file's modules can have
(docs/lora-format.md, 'DoRA and LyCORIS')."""

from __future__ import annotations

#: what ``lora.type`` can train (the one list; the schema, the CLI, the GUI and the docs take it from here)
ADAPTER_TYPES = ("lora", "locon", "loha", "lokr", "dora")

#: tensor forms of one module in a file; DoRA is a ``dora_scale`` on top of any of them
MODULE_KINDS = ("lora", "loha", "lokr")

#: a module kind -> the words users know
KIND_LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}

#: the LyCORIS ``algo`` written in ``ss_network_args`` for each trained type (DoRA is LyCORIS' locon + dora_wd)
LYCORIS_ALGO = {"locon": "locon", "loha": "loha", "lokr": "lokr", "dora": "locon"}
