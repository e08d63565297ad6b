"""The metadata of a LoRA file: kohya's ``ss_*``, ``modelspec.*`` and ours, from the config and one RunStats (docs/lora-format.md, 'Metadata')."""

from __future__ import annotations

import datetime
import json
import math
import time
from dataclasses import dataclass, field

from trainer.lora.form import _check_family

ARCHITECTURES = {  # (family, v-prediction) -> modelspec.architecture
    ("sd1", False): "stable-diffusion-v1/lora", ("sd1", True): "stable-diffusion-v1/lora",
    ("sd2", False): "stable-diffusion-v2-512/lora", ("sd2", True): "stable-diffusion-v2-768-v/lora",
    ("sdxl", False): "stable-diffusion-xl-v1-base/lora", ("sdxl", True): "stable-diffusion-xl-v1-base/lora",
}
IMPLEMENTATIONS = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}

_OPTIMIZER_NAMES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                    "prodigy": "prodigyopt.Prodigy", "lion": "lion_pytorch.Lion",
                    "adafactor": "transformers.optimization.Adafactor"}



def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _bucket_info(info: dict) -> dict:
    """Normalise to kohya's {"buckets": {"<i>": {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}."""
    buckets = info.get("buckets", {}) if isinstance(info, dict) else {}
    if isinstance(buckets, list):
        buckets = dict(enumerate(buckets))
    out = {str(k): {"resolution": [int(x) for x in b["resolution"]], "count": int(b["count"])}
           for k, b in buckets.items()}
    return {"buckets": out, "mean_img_ar_error": float(info.get("mean_img_ar_error", 0.0))}


@dataclass
class RunStats:
    """What a LoRA file's metadata says about the run that wrote it.

    The recipe fills the run-level fields once at set-up and moves ``step``/``epoch`` as it trains;
    ``finished_at`` stays 0 for intermediate saves (the run has not finished).
    """
    family: str
    prediction_type: str
    base_model_name: str
    config_toml: str = ""
    started_at: float = 0.0
    session_id: int = 0
    num_train_images: int = 0
    num_reg_images: int = 0
    tag_frequency: dict = field(default_factory=dict)
    dataset_dirs: dict = field(default_factory=dict)
    reg_dataset_dirs: dict = field(default_factory=dict)
    bucket_info: dict = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    finished_at: float = 0.0
    #: [step, validation loss] pairs so far (empty without a validation set)
    validation_curve: list = field(default_factory=list)

    @classmethod
    def from_data(cls, data_stats: dict, **run) -> "RunStats":
        """From TrainData.stats() (image counts, tag frequency, folders, buckets) plus the run's own fields."""
        keys = ("num_train_images", "num_reg_images", "tag_frequency", "dataset_dirs", "reg_dataset_dirs",
                "bucket_info")
        return cls(**run, **{k: data_stats[k] for k in keys if data_stats.get(k) is not None})


def _network(lora) -> tuple[str, dict]:
    """``ss_network_module`` and ``ss_network_args``: kohya's ``networks.lora`` for LoRA (with ``conv_dim`` when
    convs train), LyCORIS' ``lycoris.kohya`` with ``algo`` and its options for the other types (docs/lora-format.md,
    'DoRA and LyCORIS'). All values are strings, as kohya writes them."""
    from trainer.lora.inject import conv_alpha_of, conv_rank_of
    from trainer.lora.kinds import LYCORIS_ALGO
    kind = getattr(lora, "type", "lora")
    conv_rank = conv_rank_of(lora)
    conv = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_alpha_of(lora)))} if conv_rank > 0 else {}
    if kind == "lora":  # as before the other types existed
        return "networks.lora", ({"conv_dim": str(lora.conv_rank), "conv_alpha": str(float(lora.conv_alpha))}
                                 if lora.conv_rank > 0 else {})
    args = {"algo": LYCORIS_ALGO[kind], **conv}
    if kind == "dora":
        args.update(dora_wd="True", wd_on_output="False")
    if kind in ("loha", "lokr"):
        args.update(rank_dropout=str(float(lora.rank_dropout)), module_dropout=str(float(lora.module_dropout)),
                    use_tucker=str(bool(lora.use_tucker)))
    else:
        args["dropout"] = str(float(lora.dropout))
    if kind == "lokr":
        args.update(factor=str(int(lora.lokr_factor)), full_matrix=str(bool(lora.lokr_full_matrix)),
                    decompose_both=str(bool(lora.lokr_decompose_both)))
    return "lycoris.kohya", args


def build_metadata(cfg, stats: RunStats) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` keys of docs/lora-format.md, 'Metadata' plus our ``lorastudio.*`` keys.

    The hash keys are added by save_lora.
    """
    from trainer import __version__

    family = stats.family
    _check_family(family)
    v_pred = stats.prediction_type in ("v_prediction", "v")
    lora, train, data, out = cfg.lora, cfg.train, cfg.data, cfg.output
    te_trained = bool(lora.train_text_encoder)
    te_lr = train.text_encoder_lr if train.text_encoder_lr >= 0 else train.learning_rate
    network_module, network_args = _network(lora)
    batches_per_epoch = max(1, math.ceil(math.ceil(max(1, stats.num_train_images) / train.batch_size)
                                         / train.gradient_accumulation_steps))
    base_version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    if v_pred and family != "sdxl":
        base_version += "_v"
    res = int(data.resolution)
    md = {
        "ss_network_module": network_module,
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(float(lora.alpha)),
        "ss_network_args": _json(network_args),
        "ss_network_dropout": str(float(lora.dropout)),
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": base_version,
        "ss_output_name": out.name,
        "ss_training_started_at": str(float(stats.started_at)),
        # intermediate saves have finished_at=0: the run has not finished
        "ss_training_finished_at": str(float(stats.finished_at)) if stats.finished_at else "None",
        "ss_session_id": str(int(stats.session_id)),
        "ss_epoch": str(int(stats.epoch)),
        "ss_steps": str(int(stats.step)),
        "ss_max_train_steps": str(train.max_steps),
        "ss_num_epochs": str(math.ceil(train.max_steps / batches_per_epoch)),
        "ss_sd_model_name": stats.base_model_name,
        "ss_clip_skip": str(cfg.model.clip_skip),
        "ss_resolution": f"({res}, {res})",
        "ss_learning_rate": str(train.learning_rate),
        "ss_unet_lr": str(train.learning_rate),
        "ss_text_encoder_lr": str(te_lr) if te_trained else "None",
        "ss_network_train_unet_only": str(not te_trained),
        "ss_optimizer": f"{_OPTIMIZER_NAMES.get(train.optimizer, train.optimizer)}(weight_decay={train.weight_decay})",
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.lr_warmup_steps),
        "ss_seed": str(train.seed),
        "ss_mixed_precision": train.mixed_precision,
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_max_grad_norm": str(train.max_grad_norm),
        "ss_num_train_images": str(int(stats.num_train_images)),
        "ss_num_reg_images": str(int(stats.num_reg_images)),
        "ss_noise_offset": str(float(train.noise_offset)),
        "ss_min_snr_gamma": str(float(train.min_snr_gamma)),
        "ss_caption_dropout_rate": str(float(data.caption_dropout)),
        "ss_shuffle_caption": str(data.shuffle_caption),
        "ss_keep_tokens": str(data.keep_tokens),
        "ss_enable_bucket": str(data.enable_bucket),
        "ss_min_bucket_reso": str(data.min_bucket_px),
        "ss_max_bucket_reso": str(data.max_bucket_px),
        "ss_bucket_no_upscale": str(data.bucket_no_upscale),
        "ss_cache_latents": str(data.cache_latents),
        "ss_flip_aug": str(data.flip),
        "ss_prior_loss_weight": str(float(data.prior_loss_weight)),
        "ss_bucket_info": _json(_bucket_info(stats.bucket_info or {})),
    }
    if out.dataset_metadata:
        # captions and folder names can be private: only embedded when the user leaves this on
        md["ss_tag_frequency"] = _json({str(d): {str(t): int(c) for t, c in tags.items()}
                                        for d, tags in (stats.tag_frequency or {}).items()})
        md["ss_dataset_dirs"] = _json({str(d): {"n_repeats": int(v["n_repeats"]), "img_count": int(v["img_count"])}
                                       for d, v in (stats.dataset_dirs or {}).items()})
        md["ss_reg_dataset_dirs"] = _json({str(d): {"n_repeats": int(v["n_repeats"]), "img_count": int(v["img_count"])}
                                           for d, v in (stats.reg_dataset_dirs or {}).items()})
    md.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURES[(family, v_pred)],
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.implementation_version": f"lorastudio/{__version__}",
        "modelspec.title": out.name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.datetime.fromtimestamp(stats.finished_at or time.time()).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.encoder_layer": str(cfg.model.clip_skip),
    })
    for key, value in (("author", out.author), ("description", out.description),
                       ("trigger_phrase", out.trigger_phrase)):
        if value:
            md[f"modelspec.{key}"] = value
    if stats.validation_curve:
        md["lorastudio.validation_loss"] = repr(float(stats.validation_curve[-1][1]))
        md["lorastudio.validation_curve"] = _json([[int(s), float(v)] for s, v in stats.validation_curve])
    md["lorastudio.config"] = stats.config_toml
    md["lorastudio.version"] = __version__
    return md


