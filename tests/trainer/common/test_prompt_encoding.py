"""Long prompts in 77-token windows, A1111 weights and BREAK, clip skip and SDXL's pooled embedding
(trainer.common.prompt_encoding), on the tiny models' random SD1- and SDXL-shaped text encoders with the real CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch

from trainer.common.prompt_encoding import PromptEncoder, count_tokens, prompt_windows
from trainer.generate.prompt_syntax import parse_attention
from trainer.models.tokenizers import clip_tokenizer
from tests.fixtures.tiny_models import _text_encoder

WORDS = ("red blue green cube ball star tree house river cloud stone glass paper metal wood light dark small "
         "large round").split()


def words(n: int, shift: int = 0) -> str:
    """n single-token words (each a whole CLIP token)."""
    return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def sd1():
    """(family, tokenizers, text encoders) of the tiny SD1 model (tests.fixtures.tiny_models)."""
    return "sd1", [clip_tokenizer()], [_text_encoder(32, False, 1)]


@pytest.fixture(scope="module")
def sdxl():
    return "sdxl", [clip_tokenizer(), clip_tokenizer("!")], [_text_encoder(32, False, 1),
                                                              _text_encoder(64, True, 2, act="gelu")]


def single_window_reference(model, texts, clip_skip):
    """What one plain tokenizer(max_length=77) call per encoder gives, the encoding before windows existed."""
    family, toks, tes = model
    ids = [t(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids for t in toks]
    if family == "sdxl":
        o = [te(i, output_hidden_states=True) for te, i in zip(tes, ids)]
        return torch.cat([x.hidden_states[-(clip_skip + 1)] for x in o], -1), o[1].text_embeds
    out = tes[0](ids[0], output_hidden_states=True)
    if clip_skip == 1:
        return out.last_hidden_state, None
    return getattr(tes[0], "text_model", tes[0]).final_layer_norm(out.hidden_states[-clip_skip]), None


def test_words_are_single_tokens(sd1):
    assert count_tokens(sd1[1][0], [words(150)]) == [150]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_text_in_one_window_is_bit_identical_to_a_plain_tokenizer_call(family, clip_skip, sd1, sdxl):
    pipe = sd1 if family == "sd1" else sdxl
    fam, toks, tes = pipe
    texts = ["zxq style, a red ball", "", words(90)]  # the last is cut after 75 tokens, as before
    enc = PromptEncoder(fam, toks, clip_skip)
    with torch.no_grad():
        ref, ref_pooled = single_window_reference(pipe, texts, clip_skip)
        emb, pooled = enc.encode_captions(texts, tes, 1)
        ref1, ref1_pooled = single_window_reference(pipe, texts[:1], clip_skip)
        one, one_pooled = enc.encode_runs(parse_attention(texts[0]), tes)
    assert emb.shape == ref.shape and torch.equal(emb, ref)
    assert torch.equal(one, ref1)  # the generator's path: a prompt without weights is a plain prompt
    if fam == "sdxl":
        assert torch.equal(pooled, ref_pooled) and torch.equal(one_pooled, ref1_pooled)


def test_150_tokens_give_two_windows_and_the_second_one_matters(sd1):
    fam, toks, tes = sd1
    enc = PromptEncoder(fam, toks, 2)
    a, b = words(150), words(75) + " " + words(75, shift=3)  # same first 75 tokens, different last 75
    with torch.no_grad():
        emb, _ = enc.encode_captions([a, b], tes, 2)
        first, _ = enc.encode_captions([words(75)], tes, 1)
        prompt, _ = enc.encode_runs(parse_attention(a), tes)
    assert emb.shape == (2, 154, 32)
    assert torch.allclose(emb[0, :77], first[0], atol=1e-5) and torch.equal(emb[0, :77], emb[1, :77])
    assert (emb[0, 77:] - emb[1, 77:]).abs().max() > 1e-3  # the second window's tokens are read
    assert prompt.shape == (1, 154, 32) and torch.equal(prompt[0], emb[0])  # the generator needs 2 windows too


def test_sdxl_windows_both_encoders_and_pools_from_the_first_window(sdxl):
    fam, toks, tes = sdxl
    enc = PromptEncoder(fam, toks, 1)
    with torch.no_grad():
        emb, pooled = enc.encode_captions([words(150), words(75) + " " + words(75, shift=5)], tes, 2)
        _, first_pooled = enc.encode_captions([words(75)], tes, 1)
    assert emb.shape == (2, 154, 32 + 64) and pooled.shape == (2, 64)
    # (a batch of 4 windows against one: equal up to float rounding)
    assert torch.allclose(pooled[0], first_pooled[0], atol=1e-5) and torch.equal(pooled[0], pooled[1])
    assert (emb[0, 77:, :32] - emb[1, 77:, :32]).abs().max() > 1e-3  # both encoders see window 2
    assert (emb[0, 77:, 32:] - emb[1, 77:, 32:]).abs().max() > 1e-3


def test_a_weight_scales_its_tokens_and_the_window_keeps_its_mean(sd1):
    fam, toks, tes = sd1
    enc = PromptEncoder(fam, toks, 1)
    with torch.no_grad():
        plain, _ = enc.encode_runs(parse_attention("a red ball"), tes)
        weighted, _ = enc.encode_runs(parse_attention("a (red:1.5) ball"), tes)
        same, _ = enc.encode_runs(parse_attention("a (red:1) ball"), tes)
    w = torch.ones(77)
    w[2] = 1.5  # BOS, "a", "red"
    expected = plain * w[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    assert torch.allclose(weighted, expected, atol=1e-6)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-7)
    assert torch.equal(same, plain)


def test_break_and_comma_backtrack_choose_the_windows(sd1):
    tok = sd1[1][0]
    w = prompt_windows(tok, parse_attention("a red ball BREAK a blue cube"))
    assert w.count == 2
    ids = tok(["a blue cube"], add_special_tokens=False).input_ids[0]
    assert w.ids[1, :len(ids) + 2].tolist() == [tok.bos_token_id, *ids, tok.eos_token_id]
    # 70 words, a comma, 10 words: the window would fill 4 tokens after the comma; those words move on
    w = prompt_windows(tok, parse_attention(words(70) + ", " + words(10)))
    assert w.count == 2 and w.ids[0, 72].item() == tok.eos_token_id and w.ids[1, 1:11].tolist() == \
        tok([words(10)], add_special_tokens=False).input_ids[0]
    assert prompt_windows(tok, parse_attention(words(70) + ", " + words(10)), comma_backtrack=0).ids[0, 72] != \
        tok.eos_token_id


def test_prompt_and_negative_are_padded_to_the_same_windows_and_sdxl_zeroes_an_empty_negative(sd1, sdxl):
    fam, toks, tes = sd1
    with torch.no_grad():
        out = PromptEncoder(fam, toks, 1).pipeline_embeddings(parse_attention(words(100)), parse_attention(""), tes)
    assert out["prompt_embeds"].shape == out["negative_prompt_embeds"].shape == (1, 154, 32)
    fam, toks, tes = sdxl
    with torch.no_grad():
        out = PromptEncoder(fam, toks, 1).pipeline_embeddings(parse_attention("a cat"), parse_attention(""), tes,
                                                              zero_empty_negative=True)
    assert not out["negative_prompt_embeds"].any() and not out["negative_pooled_prompt_embeds"].any()
    assert out["pooled_prompt_embeds"].shape == (1, 64)
