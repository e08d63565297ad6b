"""Long captions in training (data.max_token_length) and samples the way kohya writes them (per-prompt options,
samples at epoch ends)."""

from __future__ import annotations

import pytest
from PIL import Image

from trainer import config as C
from trainer.errors import UserError
from trainer.train.data import build_data
from trainer.train.events import read_events
from trainer.train.recipe import LoopState, _epochs_done, _samples_due, train

from tests.fixtures.runs import tiny_overrides

WORDS = "red blue green cube ball star tree house river cloud stone glass paper metal wood".split()


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def cfg_of(*args, **kw) -> C.Config:
    return C.load_config(None, tiny_overrides(*args, **kw))


def test_a_caption_longer_than_the_limit_warns_once_naming_its_file(image_folder, tmp_path):
    (image_folder / "img001.txt").write_text(words(200), encoding="utf-8")
    (image_folder / "img002.txt").write_text(words(100), encoding="utf-8")
    said: list[str] = []
    build_data(cfg_of("m", image_folder, tmp_path), said.append)
    long = [w for w in said if "longer than data.max_token_length" in w]
    assert len(long) == 2
    assert long[0].startswith(str(image_folder / "img001.txt")) and "200 tokens" in long[0]
    assert "set data.max_token_length to 225" in long[0] and "set data.max_token_length to 150" in long[1]
    said.clear()
    build_data(cfg_of("m", image_folder, tmp_path, **{"data.max_token_length": 150}), said.append)
    assert [w.split(":")[0] for w in said if "tokens" in w] == [str(image_folder / "img001.txt")]
    said.clear()
    build_data(cfg_of("m", image_folder, tmp_path, **{"data.max_token_length": 225}), said.append)
    assert not [w for w in said if "tokens" in w]


def test_samples_every_n_epochs_come_at_the_step_that_ends_the_epoch():
    s = C.SampleConfig(every_steps=0, every_epochs=2)
    state = LoopState(step=3, epoch=1, batch_idx=3, batches=[[0], [1], [2]])
    assert _epochs_done(state) == 2
    assert _samples_due(s, 3, 1, 2) and not _samples_due(s, 2, 1, 1) and not _samples_due(s, 6, 2, 3)
    both = C.SampleConfig(every_steps=3, every_epochs=2)
    assert _samples_due(both, 3, 1, 2) and _samples_due(both, 6, 2, 2)


def test_tiny_run_with_150_tokens_and_kohya_sample_options(tiny_sd1_dir, image_folder, tmp_path):
    (image_folder / "img000.txt").write_text("zxq style, " + words(160), encoding="utf-8")
    prompts = ["zxq style, (shapes:1.3) --n blurry --w 64 --h 96 --d 42 --ss euler_a --s 2 --l 4",
               words(100) + " --s 1"]
    # 6 images, batches of 2: an epoch is 3 steps; samples at its end (step 3) and with the final save (step 4)
    res = train(cfg_of(tiny_sd1_dir, image_folder, tmp_path / "o", steps=4, **{
        "data.max_token_length": 150, "lora.train_text_encoder": False, "sample.every_epochs": 1,
        "sample.prompts": prompts, "sample.width": 64, "sample.height": 64, "sample.steps": 3}))
    names = sorted(p.name for p in (res.run_dir / "samples").glob("*.png"))
    assert names == ["step00000003-00.png", "step00000003-01.png", "step00000004-00.png", "step00000004-01.png"]
    first = Image.open(res.run_dir / "samples" / "step00000003-00.png")
    assert first.size == (64, 96)
    text = first.info["parameters"]
    assert text.startswith("zxq style, (shapes:1.3)\nNegative prompt: blurry\n")
    for part in ("Steps: 2", "Sampler: Euler a", "CFG scale: 4", "Seed: 42", "Size: 64x96"):
        assert part in text
    second = Image.open(res.run_dir / "samples" / "step00000003-01.png")
    assert second.size == (64, 64) and "Steps: 1" in second.info["parameters"] and "Seed: 2" in second.info["parameters"]
    events = read_events(res.run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "sample"] == [3, 3, 4, 4]
    assert any(e["type"] == "log" and "img000.txt" in e["message"] and "max_token_length (150)" in e["message"]
               for e in events)


def test_a_bad_sample_option_stops_the_run_before_anything_is_written(tiny_sd1_dir, image_folder, tmp_path):
    cfg = cfg_of(tiny_sd1_dir, image_folder, tmp_path / "o", **{"sample.prompts": ["ok", "a cat --w 13"],
                                                                 "sample.every_steps": 2})
    with pytest.raises(UserError, match=r"^sample.prompts line 2 \('a cat --w 13'\): --w 13 is not a multiple of 8$"):
        train(cfg)
    assert not (tmp_path / "o").exists()
