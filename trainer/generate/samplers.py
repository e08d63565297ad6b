"""Inference schedulers by the names people use (Euler, Euler a, DPM++ 2M Karras, DDIM, UniPC)."""

from __future__ import annotations

#: name -> (the label A1111 shows, the diffusers scheduler class, its extra from_config arguments). The one list
#: of samplers: ``SAMPLERS``, the generation settings' choices, the config's ``sample.sampler`` and every
#: front-end's menu come from it.
_TABLE: dict[str, tuple[str, str, dict]] = {
    "euler": ("Euler", "EulerDiscreteScheduler", {}),
    "euler_a": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIM", "DDIMScheduler", {}),
    "unipc": ("UniPC", "UniPCMultistepScheduler", {}),
}

#: name -> the label A1111 users know.
SAMPLERS = {name: label for name, (label, _, _) in _TABLE.items()}


def make_sampler(name: str, scheduler_config: dict):
    """A fresh diffusers scheduler for `name`, built from the base model's scheduler config."""
    import diffusers

    from trainer.errors import UserError
    if name not in _TABLE:
        raise UserError(f"sampler: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}", field="sampler")
    _, cls_name, extra = _TABLE[name]
    return getattr(diffusers, cls_name).from_config(dict(scheduler_config), **extra)


def png_parameters(prompt: str, negative: str, *, steps: int, sampler: str, cfg_scale: float, seed: int,
                   width: int, height: int, model: str = "", loras: list[tuple[str, str, float]] | None = None,
                   extra: dict | None = None) -> str:
    """A1111-style 'parameters' text: prompt, negative, then one line of key: value pairs."""
    fields = [f"Steps: {steps}", f"Sampler: {SAMPLERS.get(sampler, sampler)}", f"CFG scale: {cfg_scale:g}",
              f"Seed: {seed}", f"Size: {width}x{height}"]
    if model:
        fields.append(f"Model: {model}")
    if loras:
        hashes = ", ".join(f"{n.replace(':', '').replace(',', '')}: {h[:12]}" for n, h, _ in loras)
        fields.append(f'Lora hashes: "{hashes}"')
        fields.append('Lora weights: "' + ", ".join(f"{n}: {w:g}" for n, _, w in loras) + '"')
    for k, v in (extra or {}).items():
        fields.append(f"{k}: {v}")
    text = prompt
    if negative:
        text += f"\nNegative prompt: {negative}"
    return text + "\n" + ", ".join(fields)


def save_png(img, path, parameters: str) -> None:
    """Save a PNG with its generation parameters in a 'parameters' tEXt chunk, atomically."""
    from pathlib import Path

    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
