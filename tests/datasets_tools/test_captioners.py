"""Captioners loaded through the real code from tiny local models: BLIP (transformers) and a WD14-shaped ONNX tagger."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.datasets_tools.unusable_files import (GOOD, UNUSABLE, assert_names_every_unusable, captions_of,
                                                 make_unusable_folder)
from tests.fixtures.dataset_images import pattern_image, read_only
from PIL import Image

from datasets_tools import captions as C
from datasets_tools.captioners import (CAPTIONERS, REGISTRY, TemplateCaptioner, WD14Captioner, caption_folder,
                                       captioner_name, check_captioner_args, clean_name, get_captioner)
from datasets_tools.errors import DatasetError

TAGS = [  # (name, category): 0 general, 4 character, 9 rating
    ("general", 9), ("explicit", 9),
    ("blue_background", 0), ("red_theme", 0), ("hatsune_miku", 4), ("^_^", 0), ("long_hair", 0), ("green_theme", 0),
]


def build_tiny_wd14(path, size=448, tags=TAGS, nhwc=True):
    """An ONNX graph with the tagger's layout: NHWC float32 BGR in, per-tag sigmoid probabilities out.

    Probabilities follow the mean colour: B -> blue_background, R -> red_theme, G -> hatsune_miku and
    green_theme; '^_^', 'long_hair' and rating 'general' are always on.
    """
    import onnx
    from onnx import TensorProto, helper

    path.mkdir(parents=True, exist_ok=True)
    t = len(tags)
    w = np.zeros((3, t), np.float32)
    b = np.full((t,), -5.0, np.float32)
    names = [n for n, _ in tags]
    w[0, names.index("blue_background")] = w[2, names.index("red_theme")] = 10 / 255
    w[1, names.index("hatsune_miku")] = w[1, names.index("green_theme")] = 10 / 255
    for n in ("^_^", "long_hair", "general"):
        b[names.index(n)] = 5.0
    shape = ["batch", size, size, 3] if nhwc else ["batch", 3, size, size]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2] if nhwc else [2, 3], keepdims=0),
         helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
         helper.make_node("Add", ["logits0", "B"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["output"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", t])],
        initializer=[onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path / "model.onnx"))
    lines = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c) in enumerate(tags)]
    (path / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A tiny random BlipForConditionalGeneration + BlipProcessor (BERT tokenizer from a 16-word vocab)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    d = tmp_path_factory.mktemp("tiny_blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "cat", "dog", "photo", "of", "the", "on",
             "red", "blue", "sitting"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]")
    text = dict(vocab_size=len(words), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64, bos_token_id=5,
                eos_token_id=3, sep_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(d)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(d)
    return d


@pytest.fixture
def ds(tmp_path):
    root = tmp_path / "ds"
    (root / "3_zxq_style").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "3_zxq_style" / "red_car_01.png")
    Image.new("RGB", (30, 40), (0, 0, 255)).save(root / "3_zxq_style" / "blue-sky.jpg")
    Image.new("RGBA", (32, 32), (0, 255, 0, 255)).save(root / "green.png")
    (root / "green.txt").write_text("hand written", encoding="utf-8")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    return root


def test_blip_through_real_loading_code(tiny_blip, ds):
    cap = get_captioner("blip", model=str(tiny_blip), max_new_tokens=6, num_beams=1)
    assert cap.device == "cpu" and "BlipForConditionalGeneration" in cap.describe()
    texts = cap.caption_batch([Image.new("RGB", (50, 40), "red"), Image.new("RGB", (20, 60), "blue")])
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert not any("[DEC]" in t or "[SEP]" in t for t in texts)
    run = caption_folder(ds, cap, trigger="zxq", batch_size=2, progress=lambda d, t: None)
    assert sorted(run.written) == ["3_zxq_style/blue-sky.txt", "3_zxq_style/red_car_01.txt"]
    assert run.kept == ["green.txt"] and [p.kind for p in run.failed] == ["truncated"]
    assert (ds / "3_zxq_style" / "red_car_01.txt").read_text().startswith("zxq, ")
    assert (ds / "green.txt").read_text() == "hand written"


def test_wd14_tags_thresholds_blacklist_and_spaces(tmp_path):
    model = build_tiny_wd14(tmp_path / "wd")
    cap = get_captioner("wd14", model=str(model))
    red, blue = Image.new("RGB", (60, 60), (255, 0, 0)), Image.new("RGB", (60, 60), (0, 0, 255))
    green = Image.new("RGB", (60, 60), (0, 255, 0))
    r, b, g = cap.caption_batch([red, blue, green])
    assert "red theme" in r.split(", ") and "blue background" not in r
    assert "blue background" in b.split(", ")
    assert g.split(", ")[0] == "hatsune miku"  # characters first
    assert "^_^" in r.split(", ")  # kaomoji underscores kept
    assert "general" not in r  # ratings only on request
    strict = WD14Captioner(str(model / "model.onnx"), character_threshold=0.999, blacklist=["long hair"],
                           underscores_to_spaces=False, include_rating=True)
    g2 = strict.caption_batch([green])[0].split(", ")
    assert "hatsune_miku" not in g2 and "green_theme" in g2 and "long_hair" not in g2 and g2[-1] == "general"


def test_wd14_preprocess_pads_white_and_is_bgr(tmp_path):
    cap = get_captioner("wd14", model=str(build_tiny_wd14(tmp_path / "wd", size=64)))
    arr = cap.preprocess(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert arr.shape == (64, 64, 3) and arr.dtype == np.float32
    assert tuple(arr[0, 0]) == (255, 255, 255)  # padding is white
    assert tuple(arr[32, 32]) == (0, 0, 255)  # red in BGR order


def test_wd14_caption_folder_overwrite_backup_and_undo(tmp_path, ds):
    cap = get_captioner("wd14", model=str(build_tiny_wd14(tmp_path / "wd", size=32)))
    run = caption_folder(ds, cap, overwrite=True, progress=lambda d, t: None)
    assert "green.txt" in run.written and run.backup
    assert "hatsune miku" in (ds / "green.txt").read_text()
    backups = C.list_backups(ds)
    assert len(backups) == 1
    assert (backups[0] / "files" / "green.txt").read_text() == "hand written"
    manifest = json.loads((backups[0] / "manifest.json").read_text())
    assert manifest["files"]["green.txt"] is True and manifest["files"]["3_zxq_style/red_car_01.txt"] is False
    C.undo(ds)
    assert (ds / "green.txt").read_text() == "hand written"
    assert not (ds / "3_zxq_style" / "red_car_01.txt").exists()


def test_template_captioner(ds):
    assert clean_name("10_zxq_style") == "zxq style" and clean_name("my-cat_003") == "my cat"
    cap = get_captioner("template", template="{trigger}, {folder}, {name}", trigger="zxq", root=ds)
    texts = cap.caption_batch([], [ds / "3_zxq_style" / "red_car_01.png", ds / "green.png"])
    assert texts == ["zxq, zxq style, red car", "zxq, ds, green"]
    run = caption_folder(ds, get_captioner("template"), trigger="zxq", progress=lambda d, t: None)
    assert (ds / "3_zxq_style" / "blue-sky.txt").read_text() == "zxq, blue sky"
    # No pixels needed, but the header is still read: a broken file gets no caption.
    assert [p.kind for p in run.failed] == ["truncated"] and not (ds / "broken.txt").exists()
    with pytest.raises(DatasetError, match="uses {oops}"):
        get_captioner("template", template="{oops}")


def test_bad_models_are_one_line_errors(tmp_path, tiny_blip):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(bert)
    wd = build_tiny_wd14(tmp_path / "wd", size=32)
    nchw = build_tiny_wd14(tmp_path / "nchw", size=32, nhwc=False)
    cases = [
        (("blip", str(tmp_path / "missing")), "not found"),
        (("blip", str(wd)), "cannot read a transformers model config"),
        (("blip", str(bert)), "'bert' model, not an image-to-text"),
        (("wd14", str(tiny_blip)), "no model.onnx"),
        (("wd14", str(tmp_path / "nope.onnx")), "not found"),
        (("wd14", str(nchw)), "does not look like a WD14 tagger"),
        (("wd14", None), "needs --model"),
        (("clip", "x"), "unknown captioner"),
    ]
    for (name, model), match in cases:
        with pytest.raises(DatasetError) as ei:
            get_captioner(name, model=model)
        assert match in str(ei.value) and "\n" not in str(ei.value), (name, model, str(ei.value))
    (wd / "selected_tags.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="not a WD14 tag list"):
        get_captioner("wd14", model=str(wd))


def test_read_only_folder_fails_before_captioning(ds):
    calls = []

    class Counting(TemplateCaptioner):
        def caption_batch(self, images, paths=None):
            calls.append(len(paths))
            return super().caption_batch(images, paths)

    with read_only(ds / "3_zxq_style"):
        with pytest.raises(DatasetError, match="read-only"):
            caption_folder(ds, Counting(), progress=lambda d, t: None)
    assert calls == [] and not (ds / "3_zxq_style" / "blue-sky.txt").exists()


def test_pattern_images_caption_in_batches(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(5):
        pattern_image(48, 32, i).save(root / f"img{i}.png")
    seen = []
    run = caption_folder(root, get_captioner("template", template="thing"), batch_size=2,
                         progress=lambda d, t: seen.append((d, t)))
    assert len(run.written) == 5 and seen == [(2, 5), (4, 5), (5, 5)]
    assert len(C.list_backups(root)) == 1  # one undo for the whole run


@pytest.mark.gpu
def test_blip_on_gpu_in_half_precision(tiny_blip):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cap = get_captioner("blip", model=str(tiny_blip), max_new_tokens=6, num_beams=1)
    assert cap.device == "cuda" and next(cap.model.parameters()).dtype == torch.float16
    assert len(cap.caption_batch([Image.new("RGB", (50, 40), "red")] * 3)) == 3


def test_git_model_through_the_same_loader(tmp_path):
    """'Any image-to-text model': a tiny GitForCausalLM (decoder-only) loads and captions through the blip path."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    d = tmp_path / "tiny_git"
    d.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "photo", "of", "the", "red", "blue"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = GitConfig(vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8),
                    vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    GitForCausalLM(cfg).save_pretrained(d)
    GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                 tokenizer=BertTokenizer(str(d / "vocab.txt"))).save_pretrained(d)
    cap = get_captioner("blip", model=str(d), max_new_tokens=5, num_beams=1)
    assert "GitForCausalLM" in cap.describe()
    texts = cap.caption_batch([Image.new("RGB", (50, 40), "red"), Image.new("RGB", (40, 50), "blue")])
    assert len(texts) == 2 and all(t and "[" not in t for t in texts)


@pytest.mark.parametrize("kind", ["template", "blip", "wd14"])
def test_unusable_files_get_no_caption_from_any_captioner(kind, tmp_path, tiny_blip):
    """A truncated PNG, a truncated JPEG, an empty file and a text file named .jpg: the scan calls them unusable,
    so no captioner writes a .txt for them (with --overwrite too), and the summary names each one."""
    root = make_unusable_folder(tmp_path / "ds")
    model = {"template": None, "blip": str(tiny_blip),
             "wd14": str(build_tiny_wd14(tmp_path / "wd", size=32))}[kind]
    opts = {"blip": {"max_new_tokens": 4, "num_beams": 1}}.get(kind, {})
    cap = get_captioner(kind, model=model, **opts)
    run = caption_folder(root, cap, overwrite=True, batch_size=4, progress=lambda d, t: None)
    assert sorted(run.written) == sorted(n.rsplit(".", 1)[0] + ".txt" for n in GOOD)
    assert set(captions_of(root)) == {"good_a.txt", "good_b.txt"}
    for name in UNUSABLE:
        assert not (root / (name.rsplit(".", 1)[0] + ".txt")).exists(), name
    assert {p.path: p.kind for p in run.skipped} == UNUSABLE and run.failed == run.skipped
    assert_names_every_unusable(run.summary())


def test_captioner_registry_names_and_aliases(tmp_path):
    assert CAPTIONERS == tuple(REGISTRY) and CAPTIONERS[0] == "template"
    assert all(REGISTRY[n].help for n in CAPTIONERS)
    assert captioner_name("BLIP2") == "blip" and captioner_name("tagger") == "wd14"
    for alias in REGISTRY["blip"].aliases + REGISTRY["wd14"].aliases:
        with pytest.raises(DatasetError, match="needs --model"):
            check_captioner_args(alias, None)
    with pytest.raises(DatasetError, match="unknown captioner 'nope'; choose one of template, blip, wd14"):
        get_captioner("nope")
