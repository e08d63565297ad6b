"""Captioning speed: pictures per second with a chat VLM at --caption-batch-size 1 against 8, same process.

A small random LLaVA (CLIP vision tower, Llama text model; built from configs and saved like a hub snapshot, no
download) captions a folder of drawn pictures through the real path: ``get_captioner("vlm", ...)`` and
``caption_folder(..., overwrite=True)``. Every answer is exactly ``--tokens`` tokens long (the model's generation
config sets min_new_tokens), so both batch sizes do the same work.

    python -m benchmarks.caption_speed [--n 16] [--batch 8] [--tokens 16] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "<eot>", "<image>"]
    tok.train_from_iterator(["a photo of a red cat sitting on the blue mat in watercolor"] * 8, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<eot>", pad_token="<pad>")


def build_model(path: Path, hidden: int, tokens: int) -> Path:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("<pad>", "<s>", "<eot>", "<image>")}
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<eot>"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    side = 64
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": side},
                                                                crop_size={"height": side, "width": side}),
                          tokenizer=tok, chat_template=template, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=4 * hidden,
                           num_hidden_layers=2, num_attention_heads=4, image_size=side, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=ids["<s>"], eos_token_id=ids["<eot>"],
                         pad_token_id=ids["<pad>"]),
        image_token_id=ids["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["<eot>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(path)
    proc.save_pretrained(path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["min_new_tokens"] = tokens  # fixed-length answers: both batch sizes generate the same tokens
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16, help="pictures")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16, help="answer length in tokens")
    ap.add_argument("--hidden", type=int, default=256, help="model width (vision and text)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="lorastudio-caption-bench-"))
    try:
        return _measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, tmp: Path) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from datasets_tools.captioners import caption_folder, get_captioner

    model = build_model(tmp / "model", args.hidden, args.tokens)
    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.n):
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(small, "RGB").resize((96 + 8 * (i % 4), 80), Image.Resampling.BICUBIC).save(data / f"{i}.png")
    cap = get_captioner("vlm", model=str(model), device="cpu", dtype="float32", max_new_tokens=args.tokens,
                        max_words=0)
    rates: dict[int, list[float]] = {}
    for batch in (1, args.batch, 1, args.batch):  # interleaved: the first round warms up, load drifts cancel
        t = time.perf_counter()
        run = caption_folder(data, cap, overwrite=True, batch_size=batch, resume=False, progress=lambda d, n: None)
        rates.setdefault(batch, []).append(args.n / (time.perf_counter() - t))
        assert len(run.written) + len(run.not_captioned) <= args.n
    one, many = max(rates[1]), max(rates[args.batch])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {cap.describe()}, {args.n} pictures, "
          f"{args.tokens}-token answers, width {args.hidden}")
    print(f"batch 1: {one:.2f} pictures/s   batch {args.batch}: {many:.2f} pictures/s   "
          f"ratio {many / one:.2f}x (batching must help: > 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
