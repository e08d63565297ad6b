"""Florence-2 and chat VLM captioners on tiny random models saved like real ones and loaded through the real code.

What reaches the model is checked (the task prompt or the chat template with the instruction and image tokens),
and what comes back: random weights answer with garbage, so the tests check the clean-up, the length cap, the
trigger, determinism and batching on that garbage, and the bad-input paths (wrong model kind, no chat
template, a picture the model cannot read, an empty answer, an interrupted run).
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from PIL import Image
from tests.datasets_tools.test_captioners import build_tiny_wd14, tiny_blip  # noqa: F401 (a fixture)
from tests.datasets_tools.tiny_vlms import (FAMILIES, HAS_TORCHVISION, build_florence2, build_llava,
                                            build_qwen_vl, tiny_tokenizer)
from tests.fixtures.dataset_images import pattern_image

from datasets_tools import captions as C
from datasets_tools.captioners import (BACKUP_DIR, CAPTIONERS, DEFAULT_INSTRUCTION, FLORENCE_TASKS, PROGRESS_FILE,
                                       caption_folder, captioner_name, captioner_options, check_captioner_args,
                                       get_captioner)
from datasets_tools.errors import DatasetError
from datasets_tools.vlm import ChatVLMCaptioner, Florence2Captioner, clean_caption

RED, BLUE = Image.new("RGB", (50, 40), (220, 30, 30)), Image.new("RGB", (40, 90), (30, 30, 220))


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    return build_florence2(tmp_path_factory.mktemp("florence2"))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_llava(tmp_path_factory.mktemp("llava"))


def spy_generate(cap) -> list[dict]:
    """Record the tensors every generate() call receives (what really reaches the model)."""
    calls, real = [], cap.model.generate

    def generate(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)
    cap.model.generate = generate
    return calls


def printable(text: str) -> bool:
    return all(unicodedata.category(c)[0] not in "C" for c in text) and "\n" not in text


def folder(root, n=4):
    root.mkdir(parents=True)
    for i in range(n):
        pattern_image(40 + 8 * i, 32, i).save(root / f"img{i}.png")
    return root


# --------------------------------------------------------------------------------------------- clean-up
def test_clean_caption_lead_ins_cap_and_truncation():
    assert clean_caption("The image shows a red cat sitting on a mat.") == "A red cat sitting on a mat."
    assert clean_caption("This image depicts a watercolor painting of a tree") == "A watercolor painting of a tree"
    assert clean_caption("In this image, we can see a dog.") == "A dog."
    assert clean_caption("Sure! Here is a caption: The image shows a cat.") == "A cat."
    assert clean_caption('Caption: "a fox in the snow."') == "A fox in the snow."
    assert clean_caption("The image is a digital painting of a castle.") == "A digital painting of a castle."
    assert clean_caption("This is a photo of a man in a hat. He is", truncated=True) == "A man in a hat."
    assert clean_caption("A cat. A dog. A bird sings loudly today", max_words=6) == "A cat. A dog."
    assert clean_caption("one two three four five, six", max_words=5) == "One two three four five"
    assert clean_caption("a\x12b\ufffd\n c  d") == "A b c d"
    assert clean_caption("The image shows ") == "The image shows" and clean_caption("  ") == ""
    assert len(clean_caption("x " * 500, max_words=0).split()) == 500  # 0: no cap


# --------------------------------------------------------------------------------------------- Florence-2
def test_florence2_task_prompts_reach_the_model(florence):
    cap = get_captioner("florence2", model=str(florence), max_new_tokens=6, num_beams=1)
    assert isinstance(cap, Florence2Captioner) and cap.device == "cpu"
    assert "Florence2ForConditionalGeneration" in cap.describe()
    calls = spy_generate(cap)
    image_id = cap.processor.image_token_id
    expected = {t: cap.processor.task_prompts_without_inputs[t] for t in FLORENCE_TASKS}
    for task in FLORENCE_TASKS:
        cap.task = task
        texts = cap.caption_batch([RED, BLUE])
        ids = calls[-1]["input_ids"]
        assert calls[-1]["do_sample"] is False and calls[-1]["max_new_tokens"] == 6
        assert ids.shape[0] == 2 and (ids == image_id).sum(dim=1).tolist() == [17, 17]  # image tokens, per image
        prompt = cap.processor.tokenizer.decode(ids[0][ids[0] != image_id], skip_special_tokens=True)
        assert prompt == expected[task], task  # the task token became Florence's own question
        assert len(texts) == 2 and all(printable(t) for t in texts)
    assert cap.caption_batch([RED, BLUE]) == cap.caption_batch([RED, BLUE])  # deterministic
    assert cap.caption_batch([RED, BLUE]) == cap.caption_batch([RED]) + cap.caption_batch([BLUE])  # batching
    assert get_captioner("florence2", model=str(florence), task="more_detailed_caption").task == FLORENCE_TASKS[2]
    with pytest.raises(DatasetError, match="not a caption task"):
        get_captioner("florence2", model=str(florence), task="<OD>")


def test_florence2_folder_through_vlm_and_caption_folder(florence, tmp_path):
    root = folder(tmp_path / "ds", 3)
    cap = get_captioner("vlm", model=str(florence), max_new_tokens=12, num_beams=1, max_words=3)
    assert isinstance(cap, Florence2Captioner)  # a Florence-2 folder given as 'vlm' takes the Florence path
    run = caption_folder(root, cap, trigger="zxq", batch_size=2, progress=lambda d, t: None)
    assert len(run.written) == 3 and run.not_captioned == []
    for rel in run.written:
        text = (root / rel).read_text(encoding="utf-8")
        assert text.startswith("zxq, ") and printable(text)
        assert len(text[len("zxq, "):].split()) <= 3  # the word cap


# --------------------------------------------------------------------------------------------- chat VLMs
CHAT = [pytest.param(name, marks=pytest.mark.skipif(needs_tv and not HAS_TORCHVISION,
                                                    reason="transformers builds this processor only with torchvision"))
        for name, (_, needs_tv, _) in FAMILIES.items()]


@pytest.mark.parametrize("family", CHAT)
def test_chat_vlm_prompt_has_template_instruction_and_image_tokens(family, tmp_path):
    build, _, image_token = FAMILIES[family]
    path = build(tmp_path / family)
    cap = get_captioner("vlm", model=str(path), max_new_tokens=6)
    assert isinstance(cap, ChatVLMCaptioner) and cap.model_type == family
    calls = spy_generate(cap)
    texts = cap.caption_batch([RED, BLUE])
    assert len(texts) == 2 and all(printable(t) for t in texts)
    call = calls[-1]
    assert call["do_sample"] is False and call["num_beams"] == 1 and "pixel_values" in call
    tok = cap.processor.tokenizer
    image_id = tok.convert_tokens_to_ids(image_token)
    for row in call["input_ids"]:
        assert int((row == image_id).sum()) > 1  # the image's placeholder expanded to its feature count
        prompt = tok.decode(row, skip_special_tokens=False).replace(image_token, "")
        assert " ".join(DEFAULT_INSTRUCTION.split()) in prompt
        expected = cap.processor.apply_chat_template(cap.conversation(None)[:1], add_generation_prompt=True,
                                                     tokenize=False)
        # The whole prompt is the model's own chat template (padding on the left), up to the assistant's cue.
        assert prompt.replace(tok.pad_token, "").endswith(expected.replace(image_token, "")[-20:])
        assert call["attention_mask"][0, -1] == 1  # left padding: the answer follows the prompt directly
    assert cap.caption_batch([RED, BLUE]) == texts  # deterministic
    custom = get_captioner("vlm", model=str(path), max_new_tokens=2, prompt="Name the colour.")
    calls = spy_generate(custom)
    custom.caption_batch([RED])
    assert "Name the colour." in tok.decode(calls[-1]["input_ids"][0])
    assert DEFAULT_INSTRUCTION[:30] not in tok.decode(calls[-1]["input_ids"][0])


def test_chat_vlm_folder_trigger_cleanup_and_batching(llava, tmp_path, monkeypatch):
    root = folder(tmp_path / "ds", 4)
    cap = get_captioner("llava", model=str(llava), max_new_tokens=8, max_words=4)
    run = caption_folder(root, cap, trigger="zxq style", batch_size=3, progress=lambda d, t: None)
    first = {rel: (root / rel).read_text(encoding="utf-8") for rel in run.written}
    assert len(first) == 4 and len(set(first.values())) > 1  # the answer depends on the picture
    for text in first.values():
        assert text.startswith("zxq style, ") and printable(text) and len(text.split()) <= 2 + 4
    # Batch 1 gives the same captions as batch 3 (all prompts have the same length: nothing padded).
    again = caption_folder(root, cap, trigger="zxq style", overwrite=True, batch_size=1, progress=lambda d, t: None)
    assert {rel: (root / rel).read_text(encoding="utf-8") for rel in first} == first and again.written == []
    # What the model says is cleaned up before it is written: the answer's lead-in goes, the cap applies.
    monkeypatch.setattr(cap.processor, "batch_decode", lambda ids, **kw: [
        "The image shows a red cat sitting on a blue mat. It"] * len(ids))
    cap.max_words = 0
    run = caption_folder(root, cap, trigger="zxq", overwrite=True, batch_size=4, progress=lambda d, t: None)
    assert (root / "img0.txt").read_text(encoding="utf-8") == "zxq, A red cat sitting on a blue mat."
    assert len(run.written) == 4 and len(C.list_backups(root)) == 2  # one undo per run


# --------------------------------------------------------------------------------------------- bad input
def test_wrong_kind_of_model_folder_is_one_line(tmp_path, tiny_blip, florence, llava):
    from transformers import BertConfig, BertModel

    wd = build_tiny_wd14(tmp_path / "wd", size=32)
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(bert)
    no_template = build_llava(tmp_path / "no_template", chat_template=None)
    cases = [
        (("vlm", wd), "WD14 tagger folder (model.onnx), not a"),
        (("florence2", wd), "use --captioner wd14"),
        (("vlm", tiny_blip), "has no chat template, so it cannot take an instruction (use --captioner blip)"),
        (("vlm", no_template), "has no chat template"),
        (("vlm", bert), "'bert' model, not a vision-language model"),
        (("florence2", llava), "'llava' model, not Florence-2 (use --captioner vlm)"),
        (("vlm", tmp_path / "missing"), "not found"),
        (("florence2", None), "needs --model"),
    ]
    for (name, model), match in cases:
        with pytest.raises(DatasetError) as ei:
            get_captioner(name, model=None if model is None else str(model))
        msg = str(ei.value)
        assert match in msg and "\n" not in msg and (model is None or str(model) in msg), (name, model, msg)
    with pytest.raises(DatasetError, match="WD14 tagger folder"):  # before anything loads, as the CLI calls it
        check_captioner_args("vlm", str(wd))
    with pytest.raises(DatasetError, match="at least 1"):
        get_captioner("vlm", model=str(llava), max_new_tokens=0)


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the message shown without torchvision")
def test_qwen_without_torchvision_says_what_to_install(tmp_path):
    """A Qwen2.5-VL folder (weights, tokenizer, image processor, chat template, as on the hub) loads only with
    torchvision (its video processor); without it the error is one line that says so."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.datasets_tools.tiny_vlms import _QWEN_SPECIALS, QWEN_TEMPLATE

    d = tmp_path / "qwen"
    tok = tiny_tokenizer(_QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in _QWEN_SPECIALS}
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=37, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"])
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=56 * 56).save_pretrained(d)
    (d / "chat_template.jinja").write_text(QWEN_TEMPLATE, encoding="utf-8")
    with pytest.raises(DatasetError) as ei:
        get_captioner("qwen2.5-vl", model=str(d))
    assert "pip install torchvision" in str(ei.value) and str(d) in str(ei.value) and "\n" not in str(ei.value)


def test_picture_the_model_cannot_read_costs_only_its_caption(tmp_path):
    """A fixed-resolution model (its processor does not resize) cannot read a 48x40 picture: that picture gets no
    caption and is named, the 32x32 ones are captioned, nothing is half-written."""
    model = build_llava(tmp_path / "fixed", resize=False)
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(3):
        pattern_image(32, 32, i).save(root / f"ok{i}.png")
    pattern_image(48, 40, 9).save(root / "odd.png")
    cap = get_captioner("vlm", model=str(model), max_new_tokens=8)
    run = caption_folder(root, cap, batch_size=4, progress=lambda d, t: None)
    assert [p.path for p in run.not_captioned] == ["odd.png"] and run.not_captioned[0].kind == "caption_failed"
    msg = run.not_captioned[0].message
    assert msg.startswith("odd.png: vlm could not read it: ") and "\n" not in msg
    assert "1 not captioned (no file written): odd.png" in run.summary()
    assert not (root / "odd.txt").exists() and sorted(run.written) == ["ok0.txt", "ok1.txt", "ok2.txt"]
    assert not list(root.glob(".*.tmp"))
    # Every picture failing the same way is the model's problem, not the pictures': the run stops in one line.
    for i in range(3):
        pattern_image(48, 40, i).save(root / f"ok{i}.png")
    with pytest.raises(DatasetError, match="failed on every image of a batch") as ei:
        caption_folder(root, cap, overwrite=True, batch_size=2, progress=lambda d, t: None)
    assert "\n" not in str(ei.value)


def test_empty_answer_writes_no_caption(tmp_path):
    """A model that answers nothing at all (its generation config lets it say only the end token) writes no
    caption file; the image is named in the summary and the other captions are untouched."""
    model = build_llava(tmp_path / "mute")
    gen = json.loads((model / "generation_config.json").read_text())
    vocab = json.loads((model / "config.json").read_text())["text_config"]["vocab_size"]
    gen["suppress_tokens"] = [i for i in range(vocab) if i != gen["eos_token_id"]]
    (model / "generation_config.json").write_text(json.dumps(gen))
    root = folder(tmp_path / "ds", 2)
    (root / "img1.txt").write_text("hand written", encoding="utf-8")
    run = caption_folder(root, get_captioner("vlm", model=str(model), max_new_tokens=4), overwrite=True,
                         trigger="zxq", progress=lambda d, t: None)
    assert run.written == [] and {p.path: p.kind for p in run.not_captioned} == {
        "img0.png": "empty_caption", "img1.png": "empty_caption"}
    assert "img0.png: vlm answered with an empty caption" == run.not_captioned[0].message
    assert not (root / "img0.txt").exists() and (root / "img1.txt").read_text(encoding="utf-8") == "hand written"


# --------------------------------------------------------------------------------------------- resuming
def test_interrupted_run_continues_where_it_stopped(llava, tmp_path):
    root = folder(tmp_path / "ds", 5)
    (root / "img4.txt").write_text("hand written", encoding="utf-8")
    cap = get_captioner("vlm", model=str(llava), max_new_tokens=4)
    real, seen = cap.caption_batch, []

    def interrupted(images, paths=None):
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third batch
        seen.append([p.name for p in paths])
        return real(images, paths)
    cap.caption_batch = interrupted
    with pytest.raises(KeyboardInterrupt):
        caption_folder(root, cap, overwrite=True, batch_size=2, progress=lambda d, t: None)
    done = {p.name for p in root.glob("img[0-3].txt")}
    assert done == {"img0.txt", "img1.txt", "img2.txt", "img3.txt"}  # two finished batches are on disk
    assert (root / "img4.txt").read_text(encoding="utf-8") == "hand written"
    assert (root / BACKUP_DIR / PROGRESS_FILE).is_file()
    seen.clear()
    cap.caption_batch = lambda images, paths=None: (seen.append([p.name for p in paths]), real(images, paths))[1]
    run = caption_folder(root, cap, overwrite=True, batch_size=2, progress=lambda d, t: None)
    assert seen == [["img4.png"]] and run.written == ["img4.txt"]  # only what was left
    assert sorted(run.resumed) == sorted(done) and "continued an interrupted run: 4" in run.summary()
    assert not (root / BACKUP_DIR / PROGRESS_FILE).exists()
    # Each part is one undo step; two undos give back the folder as it was.
    C.undo(root)
    assert (root / "img4.txt").read_text(encoding="utf-8") == "hand written"
    C.undo(root)
    assert sorted(p.name for p in root.glob("*.txt")) == ["img4.txt"]
    # Without --overwrite an interrupted run needs nothing special: what it wrote is kept like any caption.
    seen.clear()
    caption_folder(root, cap, batch_size=2, progress=lambda d, t: None)
    assert seen == [["img0.png", "img1.png"], ["img2.png", "img3.png"]]


def test_registry_and_options(llava):
    assert CAPTIONERS[:3] == ("template", "blip", "wd14") and {"florence2", "vlm"} <= set(CAPTIONERS)
    assert captioner_name("JoyCaption") == "vlm" and captioner_name("Florence-2") == "florence2"
    opts = dict(template="{name}", task="<CAPTION>", prompt="Say it.", max_words=5, dtype="float32",
                general_threshold=0.5, max_new_tokens=None)
    assert captioner_options("vlm", **opts) == {"prompt": "Say it.", "max_words": 5, "dtype": "float32"}
    assert captioner_options("florence2", **opts) == {"task": "<CAPTION>", "max_words": 5, "dtype": "float32"}
    assert captioner_options("template", **opts) == {"template": "{name}"}
    cap = get_captioner("vlm", model=str(llava), dtype="bfloat16", max_new_tokens=2)
    assert str(next(cap.model.parameters()).dtype) == "torch.bfloat16" and "bfloat16" in cap.describe()
    assert len(cap.caption_batch([RED])) == 1


@pytest.mark.gpu
def test_vlm_on_gpu_in_bfloat16(llava):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cap = get_captioner("vlm", model=str(llava), max_new_tokens=4)
    assert cap.device == "cuda" and next(cap.model.parameters()).dtype in (torch.bfloat16, torch.float16)
    assert len(cap.caption_batch([RED, BLUE, RED])) == 3


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers builds the Qwen processor only with torchvision")
def test_qwen_vl_pictures_of_different_sizes_in_one_batch(tmp_path):
    """Qwen's image-token count follows the picture's size: a batch of two sizes is left-padded correctly."""
    cap = get_captioner("vlm", model=str(build_qwen_vl(tmp_path / "q")), max_new_tokens=4)
    calls = spy_generate(cap)
    cap.caption_batch([Image.new("RGB", (56, 56), "red"), Image.new("RGB", (112, 56), "blue")])  # 4 and 8 tokens
    ids, image_id = calls[-1]["input_ids"], cap.image_token_id
    counts = (ids == image_id).sum(dim=1).tolist()
    assert counts[0] != counts[1] and calls[-1]["attention_mask"][:, -1].tolist() == [1, 1]


def test_captioning_doc_names_every_captioner_and_alias():
    from pathlib import Path

    from datasets_tools.captioners import REGISTRY

    doc = (Path(__file__).resolve().parents[2] / "docs" / "captioning.md").read_text(encoding="utf-8")
    for info in REGISTRY.values():
        for name in (info.name, *info.aliases):
            assert f"`{name}`" in doc, name
    for task in FLORENCE_TASKS:
        assert f"`{task}`" in doc, task


def test_an_interrupted_run_resumes_only_under_the_same_settings(tmp_path):
    """The progress file belongs to one captioner, model, prompt and trigger: a rerun with another template
    starts over instead of skipping the pictures the first one did."""
    root = folder(tmp_path / "ds", 3)
    first = get_captioner("template", template="first")
    real = first.caption_batch
    calls = []

    def stop_after_one(images, paths=None):
        if calls:
            raise KeyboardInterrupt
        calls.append(paths)
        return real(images, paths)
    first.caption_batch = stop_after_one
    with pytest.raises(KeyboardInterrupt):
        caption_folder(root, first, overwrite=True, batch_size=1, progress=lambda d, t: None)
    run = caption_folder(root, get_captioner("template", template="second"), overwrite=True, batch_size=1,
                         progress=lambda d, t: None)
    assert run.resumed == [] and sorted(run.written) == ["img0.txt", "img1.txt", "img2.txt"]
    assert {p.read_text(encoding="utf-8") for p in root.glob("*.txt")} == {"second"}
