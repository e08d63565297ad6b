"""LoRA tools: bake, resize, merge and extract (docs/lora-format.md, 'LoRA tools'). Every LoRA file a tool
writes goes through :func:`trainer.lora.tools.write.write_lora`.

The names front-ends build their flags from live here, so building a parser does not import torch.
"""

from __future__ import annotations

#: kohya resize_lora's dynamic rank modes (``--dynamic MODE=VALUE``)
DYNAMIC_MODES = ("sv_fro", "sv_ratio", "sv_cumulative")
#: dtypes a tool can write its factors in (alpha is always float32)
PRECISIONS = ("fp16", "bf16", "fp32")
#: default extract threshold: layers whose ||TUNED - BASE|| / ||BASE|| is below it are left out
EXTRACT_THRESHOLD = 1e-4
