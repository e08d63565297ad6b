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


def check_adapter_options(lora_cfg, output=None) -> None:
    """Options that the chosen adapter type cannot use are refused before anything loads (one line each);
    ``output`` (the output section) adds the diffusers second file, which carries plain LoRA only."""
    from trainer.errors import UserError
    kind = getattr(lora_cfg, "type", "lora")
    lycoris = kind in ("loha", "lokr")
    if lycoris and lora_cfg.dropout > 0:
        raise UserError(f"lora.dropout: {kind} has no input dropout (peft's {kind} tuner); use lora.rank_dropout "
                        "or lora.module_dropout", field="lora.dropout")
    for name in ("rank_dropout", "module_dropout"):
        if not lycoris and getattr(lora_cfg, name, 0.0) > 0:
            raise UserError(f"lora.{name}: only loha and lokr have it (peft's LoRA tuner has no {name}); "
                            f"use lora.dropout", field=f"lora.{name}")
    if kind != "lokr":
        for name in ("lokr_full_matrix", "lokr_decompose_both"):
            if getattr(lora_cfg, name, False):
                raise UserError(f"lora.{name}: only for lora.type = lokr", field=f"lora.{name}")
    if not lycoris and getattr(lora_cfg, "use_tucker", False):
        raise UserError("lora.use_tucker: only for lora.type = loha or lokr", field="lora.use_tucker")
    if output is not None and getattr(output, "also_diffusers", False) and kind not in ("lora", "locon"):
        raise UserError(f"output.also_diffusers: diffusers' file carries plain LoRA only, not {kind}; the kohya "
                        "file loads in A1111, ComfyUI and our generator", field="output.also_diffusers")
