"""The recipe's shape (docs/architecture.md, 'The training recipe') and the set-up stop it makes possible."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from trainer import config as C
from trainer.lora import metadata
from trainer.train import recipe
from trainer.train.events import Phase, read_events
from trainer.train.recipe import train

from tests.fixtures.runs import tiny_overrides

SOURCE = Path(recipe.__file__).read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)


def _functions():
    return {n.name: n for n in ast.walk(TREE) if isinstance(n, ast.FunctionDef)}


def test_no_exception_is_control_flow_and_no_closure_rebinds_state():
    exceptions = [n.name for n in ast.walk(TREE) if isinstance(n, ast.ClassDef)
                  and any(getattr(b, "id", "").endswith(("Exception", "Error")) for b in n.bases)]
    assert exceptions == [], f"the recipe defines exceptions for control flow: {exceptions}"
    assert not [n for n in ast.walk(TREE) if isinstance(n, (ast.Nonlocal, ast.Global))]
    # nested functions are small read-only callbacks, never the loop's state holders
    for name, fn in _functions().items():
        inner = [n.name for n in ast.walk(fn) if isinstance(n, ast.FunctionDef) and n is not fn]
        assert len(inner) <= 2, f"{name} nests {inner}"


def test_the_loop_is_short_and_commented_and_set_up_steps_run_once():
    fn = _functions()["_loop"]
    lines = SOURCE.splitlines()[fn.lineno - 1:fn.end_lineno]
    assert len(lines) <= 60, f"_loop is {len(lines)} lines"
    assert sum(1 for ln in lines if ln.strip().startswith("#")) >= 7
    run = _functions()["_run"]
    called = [n.func.id for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    for step in ("_load_model", "_add_adapters", "_encode_images", "_text_conditioning", "_optimization",
                 "_start_state", "_loop"):
        assert called.count(step) == 1, step
    # one save function, for periodic, stopped and final saves
    assert "save_checkpoint(" in inspect.getsource(recipe._save)
    assert SOURCE.count("save_checkpoint(") == 1 and SOURCE.count("save_lora(") == 1


def test_metadata_comes_from_one_run_stats_object():
    params = list(inspect.signature(metadata.build_metadata).parameters)
    assert params == ["cfg", "stats"]


def test_stop_while_caching_latents_ends_at_once_without_files(tiny_sd1_dir, image_folder, tmp_path):
    """Stop pressed while the latents are cached: nothing trained, nothing saved, the stream says stopped."""
    seen = []

    def on_event(e):
        seen.append(e)

    def stop():
        return any(isinstance(e, Phase) and e.name == "caching latents" and e.done >= 1 for e in seen)

    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "o", steps=50))
    res = train(cfg, on_event=on_event, should_stop=stop)
    assert res.status == "stopped" and res.step == 0 and res.lora_path is None
    caching = [e for e in seen if isinstance(e, Phase) and e.name == "caching latents"]
    assert caching[-1].done == 1 < caching[-1].total  # it stopped after the first image, not at the end
    assert not list((tmp_path / "o").rglob("*.safetensors"))
    events = read_events(res.run_dir / "events.jsonl")
    assert [e["status"] for e in events if e["type"] == "run_ended"] == ["stopped"]
    assert not any(e["type"] == "run_started" for e in events)


def test_the_loop_reads_the_loss_from_the_device_once_per_sync_interval(tiny_sd1_dir, image_folder, tmp_path,
                                                                       monkeypatch):
    """On a GPU every .item()/.tolist()/float() of a device tensor waits for the queue; the loop may read device
    values only every train.sync_every_steps steps. Counted on CPU through wrappers on the Tensor methods,
    for calls made by our own code (trainer/) between the first step and the final save."""
    import sys

    import torch
    trainer_dir = str(Path(recipe.__file__).resolve().parents[1])
    seen = {"n": 0, "on": False, "where": []}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code
            if seen["on"] and caller.co_filename.startswith(trainer_dir):
                seen["n"] += 1
                seen["where"].append(f"{name} in {caller.co_name}")
            return real(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    real_save = recipe._save

    def save(*a, **k):
        seen["on"] = False
        return real_save(*a, **k)
    monkeypatch.setattr(recipe, "_save", save)
    steps = []

    def on_event(e):
        if e.type == "run_started":
            seen["on"] = True
        if e.type == "step":
            steps.append(e.step)

    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "o", steps=10,
                                             **{"train.sync_every_steps": 5}))
    train(cfg, on_event=on_event)
    assert steps == list(range(1, 11))                 # every step still reported, in order
    assert seen["n"] == 2, seen["where"]               # two reads for ten steps


def test_cached_away_parts_are_freed_on_cpu_and_training_still_validates(tiny_sd1_dir, image_folder, tmp_path):
    """Latents and frozen-encoder outputs cached, nothing samples: the VAE and the text encoder are dropped after
    set-up, and the loss and the validation loss still come out (they read only the caches)."""
    seen = []
    cfg = C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / "o", steps=2, **{
        "lora.train_text_encoder": "false", "data.validation_split": 0.2}))
    res = train(cfg, on_event=seen.append)
    assert res.status == "completed"
    logs = [e.message for e in seen if e.type == "log"]
    # the VAE first, before the text encoders run (the lower peak), then the text encoders
    assert logs.index("the VAE freed: its outputs are cached") < logs.index(
        "the text encoder(s) freed: their outputs are cached")
    assert [e.type for e in seen].count("validation") == 1
