"""Base models: load SD1.5, SD2.x and SDXL from a diffusers folder, a hub id or one .safetensors checkpoint.

``loading`` is the one entry point (``load_base_model``); ``single_file`` reads checkpoints from model sites
without a network (shipped configs in ``trainer/assets/configs``); ``tokenizers`` the shipped CLIP tokenizer;
``ldm_export`` writes diffusers weights back in the LDM single-file layout (for baking and for tests)."""
