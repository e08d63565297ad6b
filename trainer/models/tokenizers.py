"""CLIP tokenizers built from files shipped in the package, so single-file checkpoints load offline.

The shipped ``assets/clip_tokenizer/{vocab.json,merges.txt}`` were derived from open_clip's
``bpe_simple_vocab_16e6.txt.gz`` with :func:`write_vocab_from_bpe` (the same 49,408-token vocabulary as
openai/clip-vit-large-patch14 and SD2/SDXL's OpenCLIP tokenizers)::

    pip download --no-deps open-clip-torch
    unzip -p open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz > bpe.txt.gz
    python -c "from trainer.models.tokenizers import write_vocab_from_bpe as w; w('bpe.txt.gz', 'out')"
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_vocab_from_bpe(bpe_gz: str | Path, out_dir: str | Path) -> None:
    """Re-create vocab.json / merges.txt exactly as CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """SD1's tokenizer (pad = <|endoftext|>); SD2 and SDXL's second tokenizer use pad_token='!'."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"), pad_token=pad_token,
                         model_max_length=model_max_length)
