"""fp8 base weights (``train.fp8_base``, docs/config.md): the frozen Linear and Conv2d weights of the UNet (and,
with ``train.fp8_base_text_encoder``, of the text encoders) are stored as ``torch.float8_e4m3fn``, one byte per
weight, and upcast to the compute dtype (the mixed-precision dtype) one layer at a time when the layer runs, as
kohya's ``--fp8_base`` does. Biases, norms and embeddings keep the compute dtype.

The recipe converts after the adapters are injected: each peft wrapper's base layer (a plain ``nn.Linear`` /
``nn.Conv2d``) becomes a subclass of it in place, so the wrapper keeps calling it, whatever the adapter type;
the trainable adapter layers are left alone. peft's own set-up (DoRA's norm) has thus seen the loaded weights,
and a DoRA magnitude starts from the unrounded base weight, the one the file is later applied to. ``weight``
is the fp8 tensor itself (``.float()`` gives the rounded base weight, which DoRA's forward uses), and
``compute_dtype`` is what peft reads for the dtype of an adapter added later. The
backward pass keeps only the fp8 tensor and upcasts it again (no full-precision copy of a weight lives from the
forward to the backward pass). Nothing here is ever saved: checkpoints hold the adapter tensors only.

The UNet's ``conv_in`` and ``conv_out`` (a few thousand weights touching the latents directly) keep the compute
dtype, and so ``unet.dtype`` (its first parameter's) still reports it, which diffusers' pipelines read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
#: top-level UNet layers that stay in the compute dtype
UNET_KEEP = ("conv_in", "conv_out")


#: weights at least this large are upcast into one reused buffer on CPU (see _upcast)
_SCRATCH_MIN = 1 << 20
_scratch: dict[torch.dtype, torch.Tensor] = {}


def _upcast(w8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp8 weight in ``dtype``, for one op. On CPU a large one goes into a buffer kept for the next layer
    instead of a fresh allocation per call: the upcasts are the largest short-lived blocks of a training step
    (up to 118 MB for SD1.5's widest conv), and under the trainer's CPU allocator setting
    (trainer/common/cpu_alloc.py) a fresh one each call fragmented the heap: a full-size SD1.5 step grew the
    process by 1.8 GB, against 1.2-1.3 GB with the reused buffer (docs/benchmarks.md). Safe because every
    caller uses the result at once and keeps nothing of it (the autograd functions below save the fp8 tensor
    only), and a CPU step runs its layers one after another. Not while compiling (torch.compile traces the
    plain cast)."""
    if w8.device.type != "cpu" or w8.numel() < _SCRATCH_MIN or torch.compiler.is_compiling():
        return w8.to(dtype)
    buf = _scratch.get(dtype)
    if buf is None or buf.numel() < w8.numel():
        _scratch[dtype] = buf = torch.empty(w8.numel(), dtype=dtype)
    out = buf[:w8.numel()].view(w8.shape)
    out.copy_(w8)
    return out


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, bias, dtype):
        ctx.save_for_backward(w8)  # the module's own fp8 tensor: nothing new is kept for backward
        ctx.dtype = dtype
        return F.linear(x, _upcast(w8, dtype), bias)

    @staticmethod
    def backward(ctx, g):
        (w8,) = ctx.saved_tensors
        gx = g @ _upcast(w8, g.dtype) if ctx.needs_input_grad[0] else None
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb, None


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(w8)
        ctx.args = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, _upcast(w8, dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        (w8,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.args
        gx = (torch.nn.grad.conv2d_input(shape, _upcast(w8, g.dtype), g, stride, padding, dilation, groups)
              if ctx.needs_input_grad[0] else None)
        gb = g.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return gx, None, gb, None, None, None, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear with an fp8 weight, computing in ``compute_dtype``."""
    compute_dtype: torch.dtype = torch.float32

    def forward(self, x):
        return _LinearFn.apply(x.to(self.compute_dtype), self.weight, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8 weight, compute {self.compute_dtype}"


class Fp8Conv2d(nn.Conv2d):
    """nn.Conv2d (zero padding) with an fp8 weight, computing in ``compute_dtype``."""
    compute_dtype: torch.dtype = torch.float32

    def forward(self, x):
        return _ConvFn.apply(x.to(self.compute_dtype), self.weight, self.bias, self.compute_dtype, self.stride,
                             self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8 weight, compute {self.compute_dtype}"


def _convertible(m: nn.Module) -> type | None:
    if type(m) is nn.Linear:
        return Fp8Linear
    if type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return Fp8Conv2d
    return None


@torch.no_grad()
def store_fp8(model: nn.Module, compute_dtype: torch.dtype, keep: tuple[str, ...] = ()) -> int:
    """Store the frozen Linear/Conv2d weights of ``model`` as fp8 (in place, layer by layer, so the extra memory
    is one layer's); trainable layers (the adapters' own) and ``keep`` (module paths, with everything under
    them) are left as they are. Returns the number of layers converted."""
    n = 0
    for name, m in model.named_modules():
        cls = _convertible(m)
        if cls is None or m.weight.requires_grad or any(name == k or name.startswith(k + ".") for k in keep):
            continue
        m.weight = nn.Parameter(m.weight.to(FP8), requires_grad=False)
        if m.bias is not None and m.bias.dtype != compute_dtype:
            m.bias = nn.Parameter(m.bias.to(compute_dtype), requires_grad=False)
        m.__class__ = cls
        m.compute_dtype = compute_dtype
        n += 1
    return n


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what its weights occupy)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": FP8}


def unet_weight_files(folder) -> list | None:
    """The UNet's .safetensors file(s) in a diffusers folder's ``unet/`` (one file or an index of shards; the
    ``fp16`` variant only when it is all there is, as the normal loader picks); None when there are none."""
    import json
    from pathlib import Path
    unet = Path(folder) / "unet"
    for stem in ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16"):
        if (unet / f"{stem}.safetensors").is_file():
            return [unet / f"{stem}.safetensors"]
        index = unet / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError):
                return None
            files = [unet / s for s in shards]
            return files if all(f.is_file() for f in files) else None
    return None


@torch.no_grad()
def load_unet_fp8(folder, compute_dtype: torch.dtype, keep: tuple[str, ...] = UNET_KEEP):
    """A diffusers folder's UNet with its Linear/Conv2d weights stored as fp8 while they are read: the model is
    built without memory (meta parameters), then each tensor is read from the file on its own (plain reads, no
    memory map, so no page of the file counts as this process's memory), cast to ``compute_dtype`` as the normal
    loader does, and the convertible weights on to fp8, exactly as :func:`store_fp8` would have done after a
    full-precision load. The full-precision UNet never exists: the extra memory is one tensor. Returns None
    (load normally) when the folder has no UNet safetensors or its tensors do not match the model."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.models.modeling_utils import no_init_weights

    from trainer.common.safetensors_header import read_header
    files = unet_weight_files(folder)
    if not files:
        return None
    config = UNet2DConditionModel.load_config(str(folder), subfolder="unet", local_files_only=True)
    with init_empty_weights(), no_init_weights():
        unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False)
    convert = {name: cls for name, m in unet.named_modules()
               if (cls := _convertible(m)) is not None and not any(name == k or name.startswith(k + ".") for k in keep)}
    state = {}
    for path in files:
        header = read_header(path)
        with open(path, "rb") as f:
            for key, info in header.tensors.items():
                if info.dtype not in _ST_DTYPES:
                    return None
                begin, end = info.offsets
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(header.data_start + begin)
                if f.readinto(raw.numpy()) != end - begin:
                    return None
                t = raw.view(_ST_DTYPES[info.dtype]).reshape(info.shape)
                if t.is_floating_point():
                    t = t.to(compute_dtype)
                module, _, leaf = key.rpartition(".")
                if leaf == "weight" and module in convert:
                    t = t.to(FP8)
                state[key] = t
    expected = set(unet.state_dict())
    if set(state) != expected:
        return None
    unet.load_state_dict(state, strict=True, assign=True)
    del state
    for name, cls in convert.items():
        m = unet.get_submodule(name)
        m.__class__ = cls
        m.compute_dtype = compute_dtype
    return unet.eval()
