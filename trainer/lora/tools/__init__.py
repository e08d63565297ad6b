"""LoRA tools: bake, resize, merge and extract (docs/lora-format.md, 'LoRA tools'). Every LoRA file a tool
writes goes through :func:`trainer.lora.tools.write.write_lora`."""
