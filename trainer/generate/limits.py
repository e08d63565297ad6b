"""The limits of an image request, shared by the generation settings and the training config's ``[sample]``
and ``model.clip_skip`` (both import them from here, so a limit exists once)."""

MAX_SIDE = 4096          # px, width or height
MAX_STEPS = 500          # denoising steps
MAX_CFG = 50.0           # classifier-free guidance scale
MAX_SEED = 2**32 - 1
MAX_CLIP_SKIP = 12       # SD1/SDXL CLIP-L has 12 layers
MAX_BATCH = 16           # images per request
MAX_GRID_CELLS = 100     # pictures in one comparison grid
#: The LoRA weight slider of the Generate tab (min, max, step): the strengths people use. It is a slider's range,
#: not a limit: a prompt tag or --lora FILE:W may carry any finite weight, as in A1111.
LORA_WEIGHT_SLIDER = (-2.0, 2.0, 0.05)
