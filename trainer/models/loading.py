"""Load a base model (SD1.5, SD2.x, SDXL) from a diffusers folder, a hub id or a single-file checkpoint.

``load_base_model(model_cfg)`` is the one entry; it returns a :class:`BaseModel` holding the UNet, VAE, text
encoder(s), tokenizer(s) and the training noise scheduler, whatever the source was:

* a diffusers folder (has ``model_index.json``): components load with ``from_pretrained`` from local files only;
  the family comes from the pipeline class / UNet config, the prediction type from the scheduler config;
* a hub id (``org/name``): the same, fetched with ``from_pretrained``; when it cannot be fetched (offline, no
  such repo) a UserError names the id and suggests a local path;
* a ``.safetensors`` (or weights-only ``.ckpt``) checkpoint: see :mod:`trainer.models.single_file` (offline, configs
  shipped, sizes read from the tensors, prediction-type rules in its docstring).

``model_cfg.prediction_type`` overrides the detected one, ``model_cfg.vae`` swaps in another VAE (diffusers
folder, hub id or single file), ``model_cfg.family`` must agree with what the files are when it is not 'auto'.
Base weights are left as loaded (eval mode, gradients not switched off): freezing is the training loop's call.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.common.names import FAMILIES, looks_like_hub_id  # noqa: F401 (FAMILIES re-exported)
from trainer.errors import UserError, first_line
from trainer.models import single_file
from trainer.models.single_file import SUFFIXES, load_single_file, load_vae_file

log = logging.getLogger(__name__)



@dataclass
class BaseModel:
    """A loaded base model; SDXL has two text encoders and two tokenizers, SD1/SD2 one of each."""
    family: str                 # 'sd1' | 'sd2' | 'sdxl'
    prediction_type: str        # 'epsilon' | 'v_prediction'
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any        # DDPMScheduler for training
    scheduler_config: dict      # for inference schedulers: EulerDiscreteScheduler.from_config(scheduler_config)
    source: str                 # what the user gave
    name: str                   # file / folder basename (ss_sd_model_name)
    extras: dict = field(default_factory=dict)  # e.g. force_zeros_for_empty_prompt (SDXL)

    def default_scheduler(self):
        """The inference scheduler the model ships with (PNDM for SD1.5, DDIM for SD2.1, Euler for SDXL)."""
        import diffusers
        cls = getattr(diffusers, str(self.scheduler_config.get("_class_name", "")), None)
        if cls is None or not hasattr(cls, "from_config") or cls.__name__ == "DDPMScheduler":
            cls = diffusers.EulerDiscreteScheduler
        return cls.from_config(self.scheduler_config)

    def make_pipeline(self, scheduler=None):
        """A diffusers pipeline sharing this model's modules (no copies, no safety checker)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        scheduler = scheduler if scheduler is not None else self.default_scheduler()
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=self.extras.get("force_zeros_for_empty_prompt", True),
                add_watermarker=False)
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_base_model(model_cfg, *, dtype=None, device="cpu", fp8_unet: bool = False) -> BaseModel:
    """Load ``model_cfg.base`` (folder, hub id or single file) in ``dtype`` (default float32) on ``device``.
    ``fp8_unet``: the UNet's Linear/Conv weights are wanted as fp8 (train.fp8_base); from a local diffusers folder
    they are converted while the file is read (``trainer.models.fp8.load_unet_fp8``), so the full-precision UNet
    never exists; from other sources the UNet loads as usual and the recipe converts it."""
    # The libraries' per-file "Loading weights" bars would interleave with our own progress output.
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        return _load_base_model(model_cfg, dtype=dtype, device=device, fp8_unet=fp8_unet)
    finally:
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def _load_base_model(model_cfg, *, dtype=None, device="cpu", fp8_unet: bool = False) -> BaseModel:
    import torch
    from diffusers import DDPMScheduler
    dtype = dtype or torch.float32
    source = str(getattr(model_cfg, "base", "") or "").strip()
    requested_pred = getattr(model_cfg, "prediction_type", "auto") or "auto"
    if not source:
        raise UserError("model.base is empty: set it to a diffusers folder, a hub id (org/name) or a "
                        ".safetensors checkpoint", field="model.base")
    start = time.perf_counter()
    path = Path(source).expanduser()
    if path.is_dir():
        parts = _load_diffusers(str(path), source, dtype, local_only=True, fp8_unet=fp8_unet)
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{source}: model.base must be a diffusers folder, a hub id or a .safetensors "
                            f"checkpoint, not a '{path.suffix or 'no extension'}' file",
                            field="model.base", path=source)
        parts = vars(load_single_file(path, dtype=dtype, prediction_type=requested_pred,
                                      need_vae=not getattr(model_cfg, "vae", "")))
    elif looks_like_hub_id(source):
        parts = _load_diffusers(source, source, dtype, local_only=False)
    else:
        raise UserError(f"{source}: no such file or folder (model.base); give a diffusers folder, a hub id "
                        "(org/name) or a .safetensors checkpoint", field="model.base", path=source)

    family = parts["family"]
    wanted = getattr(model_cfg, "family", "auto") or "auto"
    if wanted not in ("auto", family):
        raise UserError(f"{source}: model.family is '{wanted}' but this is an {family} model; set model.family "
                        f"to 'auto' or '{family}'", field="model.family")
    pred = parts["prediction_type"] if requested_pred == "auto" else requested_pred
    sched = dict(parts["scheduler_config"], prediction_type=pred)
    vae = parts["vae"]
    if getattr(model_cfg, "vae", ""):
        base_scale = vae.config.scaling_factor if vae is not None else None
        vae = load_vae(model_cfg.vae, family=family, dtype=dtype, scaling_factor=base_scale)

    modules = [parts["unet"], vae, *parts["text_encoders"]]
    for m in modules:
        m.to(device)  # already in dtype: loaders build them that way
    noise_scheduler = DDPMScheduler.from_config({k: v for k, v in sched.items() if not k.startswith("_")})
    log.info("loaded %s (%s, %s) in %.1f s", source, family, pred, time.perf_counter() - start)
    return BaseModel(family=family, prediction_type=pred, unet=parts["unet"], vae=vae,
                     text_encoders=list(parts["text_encoders"]), tokenizers=list(parts["tokenizers"]),
                     noise_scheduler=noise_scheduler, scheduler_config=sched, source=source,
                     name=os.path.basename(source.rstrip("/\\")) or source,
                     extras={"force_zeros_for_empty_prompt": parts.get("force_zeros_for_empty_prompt", True)})


def load_vae(source: str, *, family: str, dtype=None, scaling_factor: float | None = None):
    """A separate VAE: diffusers folder (``config.json`` or ``vae/``), hub id, or single file.

    A single file carries no scaling factor, so it keeps the base model's (SD 0.18215, SDXL 0.13025).
    """
    import torch
    from diffusers import AutoencoderKL
    dtype = dtype or torch.float32
    path = Path(source).expanduser()
    if path.is_file():
        return load_vae_file(path, family=family, dtype=dtype, scaling_factor=scaling_factor)
    if path.is_dir():
        sub = "" if (path / "config.json").is_file() else "vae" if (path / "vae" / "config.json").is_file() else None
        if sub is None:
            raise UserError(f"{source}: not a diffusers VAE folder (no config.json or vae/config.json); give the "
                            "VAE folder or a .safetensors VAE file", field="model.vae", path=source)
        try:
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub or None, torch_dtype=dtype,
                                                 local_files_only=True)
        except Exception as e:
            raise UserError(f"{source}: could not load the VAE ({first_line(e)})", field="model.vae") from e
    if looks_like_hub_id(source):
        try:
            return AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
        except Exception as e:
            raise UserError(f"{source}: VAE not found locally and could not be fetched from the Hugging Face Hub "
                            f"({first_line(e)}); download it and set model.vae to its folder or file",
                            field="model.vae") from e
    raise UserError(f"{source}: no such file or folder (model.vae)", field="model.vae", path=source)


def detect_family(path_or_keys) -> str:
    """'sd1' | 'sd2' | 'sdxl' of a checkpoint file, its key names, or a diffusers folder (reads only configs)."""
    if isinstance(path_or_keys, (str, Path)) and Path(path_or_keys).is_dir():
        folder = Path(path_or_keys)
        try:
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
            unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: not a diffusers model folder ({first_line(e)})", path=str(folder)) from e
        te2 = index.get("text_encoder_2") or [None]
        return _family_from_diffusers(index, unet, 2 if te2[0] is not None else 1)
    return single_file.detect_family(path_or_keys)


# ----------------------------------------------------------------------------------------------- diffusers


def _family_from_diffusers(index: dict, unet_config, n_text_encoders: int) -> str:
    if index.get("_class_name", "").startswith("StableDiffusionXL") or \
            unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024 or \
            (unet_config.get("use_linear_projection") and n_text_encoders == 1):
        return "sd2"
    return "sd1"


def _load_diffusers(location: str, source: str, dtype, *, local_only: bool, fp8_unet: bool = False) -> dict:
    """Components of a diffusers pipeline in a local folder or on the hub."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.models.tokenizers import clip_tokenizer

    def fail(what: str, e: BaseException) -> UserError:
        if local_only:
            return UserError(f"{source}: could not load the {what} of this diffusers folder ({first_line(e)})",
                             field="model.base", path=source)
        return UserError(f"{source}: not found locally and could not be fetched from the Hugging Face Hub "
                         f"(offline, or no such model: {first_line(e)}); download it and set model.base to its "
                         "local folder or .safetensors file", field="model.base", path=source)

    if local_only:
        index_file = Path(location) / "model_index.json"
        if not index_file.is_file():
            hint = " (it looks like a single component; give the folder above it)" \
                if (Path(location) / "config.json").is_file() else ""
            raise UserError(f"{source}: not a diffusers model folder (no model_index.json){hint}; give the folder "
                            "that holds model_index.json, or a .safetensors checkpoint",
                            field="model.base", path=source)
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise fail("model_index.json", e) from e
    else:
        try:
            from huggingface_hub import hf_hub_download
            index = json.loads(Path(hf_hub_download(location, "model_index.json")).read_text(encoding="utf-8"))
        except Exception as e:  # offline, not found, gated, network: all mean "cannot use this id"
            raise fail("model_index.json", e) from e

    def pretrained(cls, subfolder: str):
        # diffusers takes torch_dtype, transformers >= 5 takes dtype
        kw = {"torch_dtype" if cls.__module__.startswith("diffusers") else "dtype": dtype,
              "local_files_only": local_only, "subfolder": subfolder}
        folder = Path(location) / subfolder
        if local_only and not [f for f in folder.glob("*.safetensors") if ".fp16." not in f.name] \
                and any(folder.glob("*.fp16.safetensors")):
            kw["variant"] = "fp16"  # downloaded with only the half-precision files
        try:  # (.bin weights, if that is all there is, are read by the libraries with weights_only=True)
            return cls.from_pretrained(location, **kw).eval()
        except Exception as e:
            raise fail(subfolder, e) from e

    sdxl_index = bool(index.get("text_encoder_2")) and index["text_encoder_2"][0] is not None
    unet = None
    if fp8_unet and local_only:
        from trainer.models.fp8 import load_unet_fp8
        try:
            unet = load_unet_fp8(location, dtype)
        except Exception as e:
            raise fail("unet", e) from e
    if unet is None:
        unet = pretrained(UNet2DConditionModel, "unet")
    family = _family_from_diffusers(index, unet.config, 2 if sdxl_index else 1)
    vae = pretrained(AutoencoderKL, "vae")
    encoders, tokenizers = [], []
    names = [("text_encoder", "tokenizer", CLIPTextModel, "<|endoftext|>" if family != "sd2" else "!")]
    if family == "sdxl":
        names.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, "!"))
    for te_name, tok_name, cls, pad in names:
        encoders.append(pretrained(cls, te_name))
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(location, subfolder=tok_name,
                                                            local_files_only=local_only))
        except Exception:  # a folder without tokenizer files: the shipped one is the same vocabulary
            log.warning("%s: no usable %s; using the built-in CLIP tokenizer", source, tok_name)
            tokenizers.append(clip_tokenizer(pad))
    try:
        sched = DDPMScheduler.load_config(location, subfolder="scheduler", local_files_only=local_only)
    except Exception as e:
        raise fail("scheduler config", e) from e
    sched = {k: v for k, v in dict(sched).items() if k != "_diffusers_version"}
    return dict(family=family, prediction_type=sched.get("prediction_type", "epsilon") or "epsilon",
                unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                scheduler_config=sched,
                force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
