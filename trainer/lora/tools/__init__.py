"""LoRA tools: bake, resize, merge and extract."""
