"""The one config schema: dataclasses whose field metadata drive CLI help, --set, presets and the GUI form.

TOML reading and writing, ``--set`` overrides and migrations live in ``trainer.config.io``."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trainer.common.names import FAMILIES
from trainer.errors import UserError
from trainer.generate import limits as L
from trainer.generate.samplers import SAMPLERS
from trainer.lora.kinds import ADAPTER_TYPES

#: Version of the preset / config file format. Bump with a migration in ``_migrate``.
PRESET_VERSION = 1

#: Loss functions, Huber schedules and timestep distributions (trainer.train.loss implements each).
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "shift")
#: Caption lengths in tokens: one, two or three 75-token windows (trainer.common.prompt_encoding), as kohya's
#: max_token_length.
MAX_TOKEN_LENGTHS = (75, 150, 225)

#: Presets larger than this are refused (they are small text files; anything bigger is not ours).
MAX_PRESET_BYTES = 64 * 1024


def opt(default, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, basic: bool = False, path: bool = False, multiple_of: int | None = None,
        label: str = ""):
    """A field with its documentation and constraints: the one description the CLI flags, --set, the GUI
    controls, presets and the docs are generated from. ``label`` is the words users know ("Network dim
    (rank)"); front-ends show it beside the key."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "basic": basic, "path": path,
            "multiple_of": multiple_of, "label": label}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Base model."""
    base: str = opt("", "Base model: a diffusers folder, a hub id, or a single-file .safetensors checkpoint "
                    "(SD1.5, SD2.x or SDXL).", basic=True, path=True, label="Base model (pretrained model)")
    family: str = opt("auto", "Model family; 'auto' detects it from the files.",
                      choices=("auto", *FAMILIES), label="Model family")
    prediction_type: str = opt("auto", "Noise target; 'auto' reads it from the model (SD2-768 models are "
                               "v_prediction).", choices=("auto", "epsilon", "v_prediction"),
                               label="Prediction type (v-parameterization)")
    vae: str = opt("", "Optional VAE to use instead of the model's own (diffusers folder or .safetensors).",
                   path=True, label="VAE")
    clip_skip: int = opt(1, "Use the text encoder's N-th hidden state from the end (1 = last, 2 = the usual "
                         "'clip skip 2' of anime models).", min=1, max=L.MAX_CLIP_SKIP, label="Clip skip")


@dataclass
class DataConfig:
    """Training images and captions."""
    dir: str = opt("", "Folder of training images (searched recursively) with same-name .txt captions. "
                   "Sub-folders named 'N_name' repeat their images N times (kohya layout).",
                   basic=True, path=True, label="Image folder")
    resolution: int = opt(512, "Target training resolution in pixels (bucket area is about resolution^2).",
                          min=64, max=4096, basic=True, label="Max resolution")
    caption_extension: str = opt(".txt", "Extension of caption files next to the images.", label="Caption extension")
    default_caption: str = opt("", "Caption for images without a caption file (usually the trigger word). "
                               "Missing captions are reported as a warning.", basic=True,
                               label="Default caption (trigger word)")
    repeats: int = opt(1, "Repeats for images not in an 'N_name' folder.", min=1, max=1000, label="Repeats")
    enable_bucket: bool = opt(True, "Aspect-ratio bucketing; off means every image is center-cropped square.",
                              label="Enable buckets")
    min_bucket_px: int = opt(256, "Smallest bucket side in pixels.", min=64, max=4096, label="Min bucket resolution")
    max_bucket_px: int = opt(1024, "Largest bucket side in pixels.", min=64, max=8192, label="Max bucket resolution")
    bucket_step_px: int = opt(64, "Bucket sides are multiples of this.", choices=(8, 16, 32, 64, 128),
                              label="Bucket resolution steps")
    bucket_no_upscale: bool = opt(False, "Never upscale: small images get a bucket no larger than themselves.",
                                  label="Don't upscale bucket resolution")
    shuffle_caption: bool = opt(False, "Shuffle comma-separated caption tags each time an image is used.",
                                label="Shuffle caption")
    keep_tokens: int = opt(0, "With shuffle: keep the first N tags (e.g. the trigger word) in place.",
                           min=0, max=100, label="Keep n tokens")
    caption_dropout: float = opt(0.0, "Probability of training an image with an empty caption.", min=0.0, max=1.0,
                                 label="Caption dropout")
    max_token_length: int = opt(75, "Longest caption in tokens: 75 is CLIP's one window; 150 and 225 encode longer "
                                "captions in 2 or 3 windows of 75 tokens concatenated (kohya's max_token_length, "
                                "A1111's long prompts). Captions longer than this are cut, with a warning naming "
                                "the caption file.", choices=MAX_TOKEN_LENGTHS, label="Max token length")
    flip: bool = opt(False, "Random horizontal flip (both orientations are encoded and cached; do not use for "
                     "asymmetric characters or text).", label="Flip augmentation")
    reg_dir: str = opt("", "Optional folder of regularisation (prior-preservation) images with captions; they "
                       "are mixed into every batch so the LoRA does not leak into unrelated prompts.",
                       path=True, label="Regularisation folder")
    prior_loss_weight: float = opt(1.0, "Loss weight of regularisation images.", min=0.0, max=10.0,
                                   label="Prior loss weight")
    cache_latents: bool = opt(True, "Encode every image with the VAE once, before training (faster, less memory).",
                              label="Cache latents")
    cache_latents_to_disk: bool = opt(False, "Also keep the latent cache on disk, keyed by file content and "
                                      "settings, so the next run skips encoding.", label="Cache latents to disk")
    cache_dir: str = opt("", "Folder for the on-disk latent cache (default: <data.dir>/.lorastudio_cache).",
                         path=True, label="Latent cache folder")
    cache_batch_size: int = opt(1, "Pictures of one bucket the VAE encodes at once while caching latents (kohya's "
                                "vae_batch_size); more is faster and needs more memory.", min=1, max=64,
                                label="VAE batch size (caching)")
    mask_dir: str = opt("", "Masked loss: a folder of masks with the images' file stems (white = train, black = "
                        "ignore, grey = a weight in between), each the size of its image. Images without a mask "
                        "train everywhere.", path=True,
                        label="Mask folder (masked loss)")
    alpha_mask: bool = opt(False, "Masked loss from the images' own alpha channel (transparent = ignore); with "
                           "data.mask_dir too, a mask file wins over the alpha channel.", label="Alpha mask")
    unmasked_weight: float = opt(0.0, "Loss weight of the masked-out area (OneTrainer's 'unmasked weight'): 0 "
                                 "ignores it, 1 turns masking off.", min=0.0, max=1.0, label="Unmasked weight")
    mask_normalize: bool = opt(False, "Divide a masked image's loss by its mask's area, so a small subject weighs "
                               "as much as a large one (OneTrainer's 'normalize masked area loss').",
                               label="Normalize by mask area")
    inverted_mask_prior: float = opt(0.0, "Masked loss: weight of the inverted-mask prior (ai-toolkit's "
                                     "inverted_mask_prior): in the masked-out area the target is the base model's "
                                     "own prediction (one more forward per step with every adapter off), so the "
                                     "LoRA learns to leave the background as the base draws it. 0 = off; needs "
                                     "data.mask_dir or data.alpha_mask. Masks act on the latent grid (8 px a "
                                     "cell): grow a mask about one cell beyond the style it keeps, or the "
                                     "prior pulls the style's edge back to the base (docs/toyworld-quality.md).",
                                     min=0.0, max=10.0,
                                     label="Inverted mask prior")
    validation_dir: str = opt("", "Validation: a folder of held-out images with captions (same layout as "
                              "data.dir); their loss is measured with fixed noise and timesteps.", path=True,
                              label="Validation folder")
    validation_split: float = opt(0.0, "Validation: hold out this fraction of the training images (seeded by "
                                  "train.seed; at least one image) instead of data.validation_dir.",
                                  min=0.0, max=0.5, label="Validation split")


@dataclass
class LoraConfig:
    """What is trained."""
    type: str = opt("lora", "Adapter type (docs/lora-format.md, 'DoRA and LyCORIS'): 'lora' (convs too when "
                    "conv_rank > 0), 'locon' (LoRA on the 3x3 convs too, at conv_rank or else rank), 'loha' and "
                    "'lokr' (LyCORIS Hadamard / Kronecker products), 'dora' (LoRA with DoRA's per-column "
                    "magnitude). Every type is written with the kohya/LyCORIS names A1111 and ComfyUI read.",
                    choices=ADAPTER_TYPES, basic=True, label="LoRA type (algo)")
    rank: int = opt(16, "LoRA rank (network dim).", min=1, max=1024, basic=True, label="Network dim (rank)")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha/rank (0 = alpha equals rank, scale 1).", min=0.0, max=4096.0, basic=True,
                       label="Network alpha")
    train_text_encoder: bool = opt(True, "Also train LoRA on the text encoder(s). A new trigger word needs it: in the "
                                   "toy-world ablations a UNet-only LoRA put its style into every prompt.", basic=True,
                                   label="Train text encoder")
    unet_targets: str = opt("attention", "UNet layers: 'attention' = to_q/to_k/to_v/to_out.0 of self- and "
                            "cross-attention; 'kohya' adds ff and proj_in/proj_out (what kohya's networks.lora "
                            "trains).", choices=("attention", "kohya"), label="UNet target layers")
    text_encoder_targets: str = opt("attention", "Text-encoder layers: 'attention' = q/k/v/out_proj; "
                                    "'attention_mlp' adds fc1/fc2.", choices=("attention", "attention_mlp"),
                                    label="Text encoder target layers")
    conv_rank: int = opt(0, "LoCon: rank for the 3x3 convs of resnets and up/down-samplers (0 = off). Convolutions "
                         "draw spatial marks (a drop shadow in the toy world) and keep shapes intact.",
                         min=0, max=1024, label="Convolution dim (LoCon)")
    conv_alpha: float = opt(1.0, "LoCon alpha for the conv layers (0 = equal to conv_rank).", min=0.0, max=4096.0,
                            label="Convolution alpha (LoCon)")
    dropout: float = opt(0.0, "Dropout on the LoRA input during training (lora, locon, dora).", min=0.0, max=0.9,
                         label="Network dropout")
    rank_dropout: float = opt(0.0, "LoHa/LoKr: drop this fraction of the update's output rows at each step "
                              "(LyCORIS' rank_dropout; training only).", min=0.0, max=0.9, label="Rank dropout")
    module_dropout: float = opt(0.0, "LoHa/LoKr: skip a whole module with this probability at each step "
                                "(training only).", min=0.0, max=0.9, label="Module dropout")
    lokr_factor: int = opt(-1, "LoKr: the Kronecker factor's size (LyCORIS' factor; -1 = as square as the "
                           "layer allows). Smaller factors make the second matrix bigger.", min=-1, max=1024,
                           label="LoKr factor")
    lokr_full_matrix: bool = opt(False, "LoKr: train both Kronecker factors as full matrices (no low-rank split; "
                                 "rank and alpha are then unused, scale 1), LyCORIS' full_matrix.",
                                 label="LoKr full matrix")
    lokr_decompose_both: bool = opt(False, "LoKr: split the first (small) factor into a low-rank pair too, "
                                    "LyCORIS' decompose_both.", label="LoKr decompose both")
    use_tucker: bool = opt(False, "LoHa/LoKr: Tucker-decompose the 3x3 convs (hada_t1/t2, lokr_t2), LyCORIS' "
                           "use_tucker.", label="Use Tucker (convs)")


@dataclass
class TrainConfig:
    """The optimisation loop."""
    max_steps: int = opt(1000, "Number of optimizer steps.", min=1, max=10_000_000, basic=True, label="Max train steps")
    batch_size: int = opt(1, "Images per step per process.", min=1, max=1024, basic=True, label="Train batch size")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated into one optimizer step.",
                                           min=1, max=1024, label="Gradient accumulate steps")
    learning_rate: float = opt(1e-4, "Learning rate of the UNet LoRA (Prodigy: use 1.0).",
                               min=0.0, max=10.0, basic=True, label="Learning rate")
    text_encoder_lr: float = opt(-1.0, "Learning rate of the text-encoder LoRA (-1 = same as learning_rate).",
                                 min=-1.0, max=10.0, label="Text encoder learning rate")
    optimizer: str = opt("adamw", "Optimizer. adamw8bit needs bitsandbytes and a CUDA GPU.",
                         choices=("adamw", "adamw8bit", "prodigy", "lion", "adafactor"), basic=True, label="Optimizer")
    weight_decay: float = opt(0.01, "Weight decay.", min=0.0, max=1.0, label="Weight decay")
    lr_scheduler: str = opt("constant", "Learning-rate schedule (after warm-up).",
                            choices=("constant", "linear", "cosine", "cosine_with_restarts"), label="LR scheduler")
    lr_warmup_steps: int = opt(0, "Linear warm-up steps.", min=0, max=1_000_000, label="LR warmup steps")
    lr_num_cycles: int = opt(1, "Restarts for cosine_with_restarts.", min=1, max=100, label="LR number of cycles")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off).", min=0.0, max=1000.0, label="Max grad norm")
    mixed_precision: str = opt("no", "Precision of the frozen base and activations; LoRA weights stay fp32.",
                               choices=("no", "fp16", "bf16"), basic=True, label="Mixed precision")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: less memory, ~20-35% slower.",
                                       label="Gradient checkpointing")
    fp8_base: bool = opt(False, "Store the frozen UNet's Linear/Conv weights as float8 (e4m3fn, one byte each) and "
                         "compute in the mixed-precision dtype, upcasting one layer at a time (kohya's fp8_base): "
                         "about half the UNet's memory of bf16. The adapter stays fp32; checkpoints hold only the "
                         "adapter. Works with every lora.type (DoRA's norm uses the fp8-rounded base weight).",
                         label="fp8 base model")
    fp8_base_text_encoder: bool = opt(False, "With train.fp8_base: the text encoders' Linear weights in float8 too.",
                                      label="fp8 text encoders")
    attention: str = opt("sdpa", "Attention kernel: PyTorch scaled_dot_product_attention or the plain path.",
                         choices=("sdpa", "default"), label="Attention kernel")
    compile: bool = opt(False, "torch.compile the UNet's transformer blocks (regional compilation: each repeated "
                        "BasicTransformerBlock with its LoRA layers, not the whole UNet, so start-up stays short). "
                        "Meant for speed on a GPU; the first steps are slower while the blocks compile (and again "
                        "when a new image size or sampling first runs). Needs a C compiler on a CPU.",
                        label="Compile (torch.compile)")
    seed: int = opt(42, "Random seed (data order, noise, LoRA init).", min=0, max=2**32 - 1, basic=True, label="Seed")
    noise_offset: float = opt(0.0, "Noise offset (crosslabs.org/blog/diffusion-with-offset-noise); 0.05-0.1 "
                              "helps very dark/bright images.", min=0.0, max=1.0, label="Noise offset")
    min_snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (arXiv:2303.09556); 5 is typical; 0 = off.",
                               min=0.0, max=100.0, label="Min SNR gamma")
    save_every_steps: int = opt(0, "Save an intermediate LoRA and a resumable checkpoint every N steps (0 = "
                                "only at the end and on stop).", min=0, max=10_000_000, label="Save every N steps")
    keep_checkpoints: int = opt(2, "Resumable checkpoints to keep (oldest are deleted).", min=1, max=1000,
                                label="Save last N checkpoints")
    sync_every_steps: int = opt(0, "Read the loss from the device every N steps (one host sync per read; progress, "
                                "the loss plot and the divergence check follow it). 0 = 1 on CPU, 10 on a GPU.",
                                min=0, max=1000, label="Loss read every N steps")
    validation_every_steps: int = opt(0, "Measure the validation loss every N steps, and at the end (0 = only at "
                                      "the end; needs data.validation_dir or data.validation_split).",
                                      min=0, max=10_000_000, label="Validate every N steps")
    validation_timesteps: int = opt(4, "Timesteps per validation image, spread evenly over the schedule; noise and "
                                    "timesteps are the same at every evaluation so the curve's points compare.",
                                    min=1, max=64, label="Validation timesteps")
    keep_best: bool = opt(False, "Also keep the LoRA of the lowest validation loss as <name>-best.safetensors.",
                          label="Keep the best LoRA")
    ema_decay: float = opt(0.0, "EMA of the trained weights (0 = off; 0.999 is typical), kept in fp32; the output "
                           "LoRA holds the EMA weights.", min=0.0, max=0.99999, label="EMA decay")
    ema_warmup: bool = opt(True, "EMA warm-up: the decay grows as min(ema_decay, (1+step)/(10+step)), so early "
                           "steps are not averaged with the random start.", label="EMA warm-up")
    ema_save_both: bool = opt(False, "With EMA, also write the plain (non-EMA) weights as <name>-raw.safetensors.",
                              label="Save EMA and raw")
    loss_type: str = opt("l2", "Loss: l2 (MSE), l1, huber or smooth_l1 (kohya's pseudo-Huber losses, "
                         "arXiv:2403.16728), with train.huber_c and its schedule.", choices=LOSS_TYPES,
                         label="Loss type")
    huber_c: float = opt(0.1, "Huber c: where the pseudo-Huber loss turns from quadratic to linear.",
                         min=1e-6, max=10.0, label="Huber c")
    huber_schedule: str = opt("snr", "How c moves with the timestep (kohya's huber_schedule): constant, "
                              "exponential, or snr (c grows toward 1 at high noise).", choices=HUBER_SCHEDULES,
                              label="Huber schedule")
    multires_noise_iterations: int = opt(0, "Multi-resolution (pyramid) noise: levels of lower-resolution noise "
                                         "added (kohya; 6-10 typical, 0 = off).", min=0, max=20,
                                         label="Multires noise iterations")
    multires_noise_discount: float = opt(0.3, "Multi-resolution noise: weight factor per level.", min=0.0, max=1.0,
                                         label="Multires noise discount")
    ip_noise_gamma: float = opt(0.0, "Input perturbation (arXiv:2301.11706): extra noise on the noisy input "
                                "only, not on the target; 0.1 typical, 0 = off.", min=0.0, max=1.0,
                                label="IP noise gamma")
    debiased_estimation: bool = opt(False, "Debiased estimation loss (arXiv:2310.15773): weight each timestep by "
                                    "1/sqrt(SNR) (v-prediction: 1/(SNR+1)).", label="Debiased estimation loss")
    min_timestep: int = opt(0, "Lowest timestep trained (of 1000).", min=0, max=999, label="Min timestep")
    max_timestep: int = opt(1000, "Highest timestep trained plus one (of 1000).", min=1, max=1000,
                            label="Max timestep")
    timestep_sampling: str = opt("uniform", "Timestep distribution in [min_timestep, max_timestep): uniform; "
                                 "logit_normal (SD3's, centred, arXiv:2403.03206); shift (uniform, then "
                                 "t' = s*t/(1+(s-1)*t), s = train.timestep_shift; s > 1 favours high noise).",
                                 choices=TIMESTEP_SAMPLINGS, label="Timestep sampling")
    timestep_shift: float = opt(1.0, "The shift s of timestep_sampling = shift.", min=0.01, max=100.0,
                                label="Timestep shift")


@dataclass
class SampleConfig:
    """Preview images during training."""
    every_steps: int = opt(0, "Generate samples every N steps (0 = off).", min=0, max=10_000_000,
                           label="Sample every N steps")
    every_epochs: int = opt(0, "Generate samples every N epochs, when an epoch ends (0 = off); with every_steps "
                            "too, both apply.", min=0, max=1_000_000, label="Sample every N epochs")
    prompts: list = opt([], "Prompts for the samples (one image each), in A1111 syntax ((word:1.2), [word], "
                        "BREAK, <lora:...> is not applied), each optionally followed by kohya's options: --n "
                        "negative prompt, --w width, --h height, --s steps, --l CFG scale, --d seed, --ss sampler; "
                        "options override the settings below for that prompt.", label="Sample prompts")
    negative_prompt: str = opt("", "Negative prompt for the samples.", label="Sample negative prompt")
    steps: int = opt(20, "Denoising steps per sample.", min=1, max=L.MAX_STEPS, label="Sample steps")
    guidance_scale: float = opt(7.0, "Classifier-free guidance scale. Higher values strengthen the LoRA's style along "
                                "with the prompt; a global colour style (a tint, a grade) can overshoot, so lower it "
                                "if one comes out stronger than the training pictures (docs/gui.md, the demo).",
                                min=0.0, max=L.MAX_CFG, label="Sample CFG scale")
    seed: int = opt(1, "Seed for the samples (the same every time so samples are comparable).",
                    min=0, max=2**32 - 1, label="Sample seed")
    width: int = opt(0, "Sample width in px (0 = data.resolution).", min=0, max=L.MAX_SIDE, multiple_of=8,
                     label="Sample width")
    height: int = opt(0, "Sample height in px (0 = data.resolution).", min=0, max=L.MAX_SIDE, multiple_of=8,
                      label="Sample height")
    sampler: str = opt("euler", "Sampler.", choices=tuple(SAMPLERS), label="Sample sampler")


@dataclass
class OutputConfig:
    """Where and how the LoRA is written."""
    dir: str = opt("outputs", "Parent folder of runs; the run lands in <dir>/<name>/.", basic=True, path=True,
                   label="Output folder")
    name: str = opt("my-lora", "Run and file name.", basic=True, label="Output name")
    save_precision: str = opt("fp16", "dtype of the saved LoRA tensors.", choices=("fp16", "bf16", "fp32"),
                              label="Save precision")
    also_diffusers: bool = opt(False, "Also write a diffusers/PEFT pytorch_lora_weights.safetensors "
                               "(for diffusers only; A1111/ComfyUI need the kohya file).",
                               label="Also save in diffusers format")
    dataset_metadata: bool = opt(True, "Embed dataset folder names and caption tag counts (ss_tag_frequency) "
                                 "in the LoRA; turn off for privacy.", label="Dataset metadata in the LoRA")
    tensorboard: bool = opt(False, "Log loss and learning rate to TensorBoard under <run>/logs.",
                            label="TensorBoard logging")
    author: str = opt("", "modelspec.author.", label="Author")
    description: str = opt("", "modelspec.description.", label="Description")
    trigger_phrase: str = opt("", "modelspec.trigger_phrase (shown by UIs as the activation text).",
                              label="Trigger phrase")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.name


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig,
            "sample": SampleConfig, "output": OutputConfig}


@dataclass(frozen=True)
class FieldInfo:
    section: str
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None
    min: float | None
    max: float | None
    basic: bool
    path: bool
    multiple_of: int | None = None
    label: str = ""

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "int", float: "float", str: "str", list: "list"}[self.type]


def _field_type(section_cls, f) -> type:
    hints = typing.get_type_hints(section_cls)
    t = hints[f.name]
    return typing.get_origin(t) or t


def fields_of(section: str, cls: type) -> Iterator[FieldInfo]:
    """The opt() fields of one dataclass, as FieldInfo keyed ``section.name``."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        m = f.metadata
        yield FieldInfo(section, f.name, _field_type(cls, f), default, m["help"], m["choices"], m["min"],
                        m["max"], m["basic"], m["path"], m["multiple_of"], m["label"])


def iter_fields() -> Iterator[FieldInfo]:
    """Every config field with its documentation, in schema order."""
    for sname, scls in SECTIONS.items():
        yield from fields_of(sname, scls)


FIELDS: dict[str, FieldInfo] = {fi.key: fi for fi in iter_fields()}


def _suggest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    if not close and "." in key:  # a right name in the wrong section, e.g. train.rank
        tail = key.split(".", 1)[1]
        close = [k for k in candidates if k.split(".", 1)[-1] == tail][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_value(fi: FieldInfo, value: Any, source: str = "") -> Any:
    """Type-check and range-check one value; returns it normalised (int->float where needed)."""
    where = f" in {source}" if source else ""
    t = fi.type
    ok = False
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{fi.key}{where}: {value} is not a finite number", field=fi.key)
    elif t is str:
        ok = isinstance(value, str)
    elif t is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise UserError(f"{fi.key}{where}: expected {fi.type_name}, got {type(value).__name__} {value!r}",
                        field=fi.key)
    if fi.choices is not None and value not in fi.choices:
        raise UserError(f"{fi.key}{where}: {value!r} is not one of {', '.join(map(str, fi.choices))}"
                        f"{_suggest(str(value), map(str, fi.choices)) if isinstance(value, str) else ''}",
                        field=fi.key)
    if fi.min is not None and value < fi.min:
        raise UserError(f"{fi.key}{where}: {value} is below the minimum {fi.min:g}", field=fi.key)
    if fi.max is not None and value > fi.max:
        raise UserError(f"{fi.key}{where}: {value} is above the maximum {fi.max:g}", field=fi.key)
    if fi.multiple_of and value % fi.multiple_of:
        raise UserError(f"{fi.key}{where}: {value} is not a multiple of {fi.multiple_of}", field=fi.key)
    return value


def parse_value(fi: FieldInfo, text: str) -> Any:
    """Parse a command-line string (from --set key=value or a form) into the field's type."""
    t = fi.type
    s = text.strip()
    try:
        if t is bool:
            low = s.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t is int:
            try:
                return int(s)
            except ValueError:
                f = float(s)  # "1e3" or "1000.0"
                if not f.is_integer():
                    raise
                return int(f)
        if t is float:
            return float(s)
        if t is list:
            if s.startswith("["):
                val = json.loads(s)
                if isinstance(val, list):
                    return [str(v) for v in val]
                raise ValueError
            return [p.strip() for p in s.split("|") if p.strip()] if s else []
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"{fi.key}: expected {fi.type_name}, got {text!r}", field=fi.key) from None
    return text
