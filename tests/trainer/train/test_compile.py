"""train.compile (regional torch.compile of the UNet's transformer blocks): a compiled run trains to the losses of
the eager run, with LoRA, fp8 base weights and gradient checkpointing, and what is saved (LoRA file, resumable
checkpoint) has the eager run's keys, never torch.compile's ``_orig_mod.``.

By default the blocks are traced by dynamo and AOT autograd (backend ``aot_eager``: the graphs our LoRA, fp8 and
checkpointed layers become, run with eager kernels), which takes seconds. Inductor, the default backend, compiles
C++ kernels for every graph, about 75 s on one CPU thread for this test: set LORASTUDIO_TEST_INDUCTOR=1 to run
the same test through it.
"""

from __future__ import annotations

import os

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import config as C
from trainer.train import recipe

from tests.fixtures.runs import tiny_overrides, train_seeing_base

SMALL = {"data.resolution": 64, "data.max_bucket_px": 64, "train.batch_size": 1, "lora.train_text_encoder": False}


def _run(tiny_sd1_dir, image_folder, out, steps=5, resume=False, **sets):
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, out, steps=steps, **SMALL, **sets))
    return train_seeing_base(cfg, resume=resume)


INDUCTOR = os.environ.get("LORASTUDIO_TEST_INDUCTOR") == "1"


@pytest.mark.parametrize("backend", ["inductor" if INDUCTOR else "aot_eager"])
def test_compiled_blocks_train_to_the_eager_losses_and_save_the_same_keys(backend, tiny_sd1_dir, image_folder,
                                                                           tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor, "compile_threads", 1)  # one thread, like every test (no compile workers)
    monkeypatch.setattr(recipe, "COMPILE_KWARGS", {"backend": backend})
    torch._dynamo.reset()
    sets = {"train.fp8_base": True, "train.gradient_checkpointing": True, "train.save_every_steps": 5}
    ref, ref_res, _ = _run(tiny_sd1_dir, image_folder, tmp_path / "eager", **sets)
    got, res, base = _run(tiny_sd1_dir, image_folder, tmp_path / "compiled", **sets, **{"train.compile": True})
    assert res.status == "completed" and len(got) == len(ref) == 5
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-3 * max(ref), (ref, got)
    blocks = [m for m in base.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)  # the blocks ran compiled
    a, b = load_file(str(ref_res.lora_path)), load_file(str(res.lora_path))
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    if backend == "aot_eager":  # eager kernels in the traced graphs: the same arithmetic, so the same tensors
        assert max(((a[k] - b[k]).norm() / (a[k].norm() + 1e-12)).item() for k in a if a[k].any()) <= 1e-5
    # (inductor sums in another order; Adam's first, nearly sign-only steps on the zero-initialised up matrices
    # turn rounding-level gradient differences into up to ~50% differences of those small tensors while the
    # losses agree to ~3e-5, measured on this CPU: there the losses are the check)
    ckpt = sorted((res.run_dir / "checkpoints").glob("step-*"))[-1]
    with safe_open(str(ckpt / "lora_state.safetensors"), "pt") as f:
        keys = set(f.keys())
    ref_ckpt = sorted((ref_res.run_dir / "checkpoints").glob("step-*"))[-1]
    with safe_open(str(ref_ckpt / "lora_state.safetensors"), "pt") as f:
        assert keys == set(f.keys()) and not any("_orig_mod" in k for k in keys)
    assert not any("_orig_mod" in k for k in base.unet.state_dict())
    # resuming loads the checkpoint into the compiled blocks' layers (strict keys) and goes on as the eager run
    ref6, ref_res6, _ = _run(tiny_sd1_dir, image_folder, tmp_path / "eager", steps=6, resume=True, **sets)
    got6, res6, _ = _run(tiny_sd1_dir, image_folder, tmp_path / "compiled", steps=6, resume=True, **sets,
                         **{"train.compile": True})
    assert res6.status == "completed" and res6.step == 6 and len(got6) == len(ref6) == 1
    assert abs(got6[0] - ref6[0]) <= 1e-2 * ref6[0], (ref6, got6)
