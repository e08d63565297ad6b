"""LoRA files and layers: key names (``keymap``), injection into the UNet and text encoders (``inject``),
the kohya/diffusers writer, the universal reader and metadata (``io``). See docs/lora-format.md."""
