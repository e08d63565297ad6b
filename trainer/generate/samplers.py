"""Inference schedulers by the names people use (Euler, Euler a, DPM++ 2M Karras, DDIM, UniPC)."""

from __future__ import annotations

SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "unipc": "UniPC",
}


def make_sampler(name: str, scheduler_config: dict):
    """A fresh diffusers scheduler for `name`, built from the base model's scheduler config."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, UniPCMultistepScheduler)

    from trainer.errors import UserError
    cfg = dict(scheduler_config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(cfg)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(cfg)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True, algorithm_type="dpmsolver++",
                                                       solver_order=2)
    if name == "ddim":
        return DDIMScheduler.from_config(cfg)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(cfg)
    raise UserError(f"sampler: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}", field="sampler")


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
