"""The toy world research code: pretraining the toy base, the LoRA harness, evaluation, ablations and mixing.

Drawing and scoring live in ``datasets_tools.toyworld`` (no torch) so the GUI demo can use them; everything
here trains models and may use all three packages."""
