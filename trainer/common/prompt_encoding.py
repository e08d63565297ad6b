"""Prompt embeddings in 77-token windows: the one text encoding of training, training samples and the generator.

CLIP reads 77 positions: BOS, up to 75 tokens, EOS, padding. A longer text is cut into windows of 75 tokens, each
wrapped in its own BOS/EOS and padded to 77, encoded separately, and the windows' hidden states are concatenated
along the sequence axis (what A1111 does, and kohya's ``max_token_length``): 150 tokens give 2 x 77 = 154
positions. SDXL windows both encoders the same way and takes its pooled embedding from the first window of the
second encoder. Clip skip is applied to every window exactly as for a single one: SD1/SD2 take the N-th hidden
state from the end through the final layer norm (A1111), SDXL the (N+1)-th from the end without it.

A window is the tokenizer's own encoding of its tokens (``[BOS] tokens [EOS] pad...``), so a text of at most 75
tokens gives exactly the ids, and so exactly the embedding, of a plain ``tokenizer(..., max_length=77)`` call.

Two ways in:

* training captions (:meth:`PromptEncoder.encode_captions`): plain text, a fixed number of windows
  (``data.max_token_length // 75``), tokens past the last window cut (training warns about those captions);
* prompts of the generator and the training samples (:meth:`PromptEncoder.pipeline_embeddings`): (text, weight)
  runs from :func:`trainer.generate.prompt_syntax.parse_attention`, as many windows as the prompt needs,
  ``BREAK`` ending a window early and A1111's comma back-off (a window that fills up within 20 tokens of a comma
  moves the words after the comma to the next one). Weights scale each token's embedding, then the window's
  mean is restored (A1111's "emphasis"); a prompt without weights is encoded exactly as a plain one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Tokens in one window, between its BOS and EOS (CLIP's 77 positions less the two).
WINDOW_TOKENS = 75
#: A window that fills up within this many tokens after a comma moves the words after the comma to the next
#: window (A1111's default "comma padding backtrack"); 0 turns it off. Used for prompts, not training captions.
COMMA_BACKTRACK = 20
#: The (text, weight) run that ends a window (what parse_attention makes of the word BREAK).
BREAK_RUN = ("BREAK", -1.0)


@dataclass
class Windows:
    """The token ids (and A1111 weights) of one text for one tokenizer: ``ids`` and ``weights`` are [n, 77]."""
    ids: torch.Tensor
    weights: torch.Tensor
    tokens: int  # tokens in the text (before any cut)

    @property
    def count(self) -> int:
        return self.ids.shape[0]

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The BPE tokens of each text, without BOS/EOS and without any cut."""
    return tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False).input_ids


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """How many tokens each text has (what ``data.max_token_length`` is compared with)."""
    return [len(ids) for ids in token_ids(tokenizer, texts)]


def _wrap(tokenizer, body: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    """One window: BOS, the tokens, EOS, then the tokenizer's padding up to 77 (weights 1 outside the tokens)."""
    pad = WINDOW_TOKENS - len(body)
    ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
    return ids, [1.0, *weights, 1.0] + [1.0] * pad


def _windows(tokenizer, bodies: list[list[int]], weights: list[list[float]], tokens: int) -> Windows:
    rows = [_wrap(tokenizer, b, w) for b, w in zip(bodies, weights)]
    return Windows(torch.tensor([r[0] for r in rows], dtype=torch.long),
                   torch.tensor([r[1] for r in rows], dtype=torch.float32), tokens)


def caption_windows(tokenizer, ids: list[int], n_windows: int) -> Windows:
    """A training caption's tokens in exactly ``n_windows`` windows: cut after the last, empty windows after the text."""
    bodies = [ids[k * WINDOW_TOKENS:(k + 1) * WINDOW_TOKENS] for k in range(n_windows)]
    return _windows(tokenizer, bodies, [[1.0] * len(b) for b in bodies], len(ids))


def prompt_windows(tokenizer, runs: list[tuple[str, float]], *, comma_backtrack: int = COMMA_BACKTRACK) -> Windows:
    """A prompt's (text, weight) runs in as many windows as it needs (at least one), the A1111 way."""
    comma = token_ids(tokenizer, [","])[0]
    comma = comma[0] if len(comma) == 1 else None
    texts = [t for t, w in runs if (t, w) != BREAK_RUN]
    tokenized = iter(token_ids(tokenizer, texts)) if texts else iter(())
    bodies: list[list[int]] = []
    weights: list[list[float]] = []
    body: list[int] = []
    wts: list[float] = []
    last_comma = -1
    total = 0

    def close() -> None:
        nonlocal body, wts, last_comma
        bodies.append(body)
        weights.append(wts)
        body, wts, last_comma = [], [], -1

    for text, weight in runs:
        if (text, weight) == BREAK_RUN:
            if body:
                close()
            continue
        for tok in next(tokenized):
            total += 1
            if (comma_backtrack and len(body) == WINDOW_TOKENS and tok != comma and last_comma != -1
                    and len(body) - last_comma <= comma_backtrack):
                cut = last_comma + 1  # the words after the window's last comma start the next window
                moved, moved_w = body[cut:], wts[cut:]
                body, wts = body[:cut], wts[:cut]
                close()
                body, wts = moved, moved_w
            if len(body) == WINDOW_TOKENS:
                close()
            if tok == comma:
                last_comma = len(body)
            body.append(tok)
            wts.append(float(weight))
    if body or not bodies:
        close()
    return _windows(tokenizer, bodies, weights, total)


def pad_windows(w: Windows, tokenizer, n: int) -> Windows:
    """``w`` with empty windows (BOS, EOS, padding) appended up to ``n`` windows."""
    if w.count >= n:
        return w
    extra = _windows(tokenizer, [[]] * (n - w.count), [[]] * (n - w.count), 0)
    return Windows(torch.cat([w.ids, extra.ids]), torch.cat([w.weights, extra.weights]), w.tokens)


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis: each position's embedding times its weight, then rescaled so each window keeps its mean.

    ``z`` is [windows, 77, dim], ``weights`` [windows, 77]."""
    w = weights.to(z.device, z.dtype)
    mean_before = z.mean(dim=(1, 2), keepdim=True)
    z = z * w[..., None]
    return z * (mean_before / z.mean(dim=(1, 2), keepdim=True))


class PromptEncoder:
    """Text embeddings of one model: its family, tokenizers and clip skip (text encoders are passed per call, so
    the trained, DDP-wrapped or LoRA-fused ones are the ones that run)."""

    def __init__(self, family: str, tokenizers, clip_skip: int = 1):
        self.family, self.tokenizers, self.clip_skip = family, list(tokenizers), int(clip_skip or 1)

    @property
    def sdxl(self) -> bool:
        return self.family == "sdxl"

    def _hidden(self, ids: torch.Tensor, text_encoders) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each encoder's hidden states of [N, 77] windows (clip skip applied) and SDXL's pooled embeddings."""
        if self.sdxl:
            # SDXL conditions on the penultimate layer of both encoders (clip skip moves both further back).
            layer = -(self.clip_skip + 1)
            o1 = text_encoders[0](ids[0].to(_device(text_encoders[0])), output_hidden_states=True)
            o2 = text_encoders[1](ids[1].to(_device(text_encoders[1])), output_hidden_states=True)
            return [o1.hidden_states[layer], o2.hidden_states[layer]], o2.text_embeds
        te = text_encoders[0]
        out = te(ids[0].to(_device(te)), output_hidden_states=self.clip_skip > 1)
        if self.clip_skip == 1:
            return [out.last_hidden_state], None
        # A1111's clip skip: an earlier layer, passed through the final layer norm.
        final_ln = getattr(te, "text_model", te).final_layer_norm
        return [final_ln(out.hidden_states[-self.clip_skip])], None

    def _encode(self, windows: list[list[Windows]], text_encoders, *, weights: bool):
        """Embeddings of B texts, each [n windows] per tokenizer: ([B, n*77, dim], pooled [B, dim] or None)."""
        b, n = len(windows[0]), windows[0][0].count
        ids = [torch.cat([w.ids for w in per_tok]) for per_tok in windows]  # [B*n, 77] per tokenizer
        hidden, pooled = self._hidden(ids, text_encoders)
        if weights:
            hidden = [emphasize(h, torch.cat([w.weights for w in per_tok])) for h, per_tok in zip(hidden, windows)]
        emb = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]
        if n > 1:
            emb = emb.reshape(b, n * emb.shape[1], emb.shape[-1])
            pooled = pooled.reshape(b, n, -1)[:, 0] if pooled is not None else None
        return emb, pooled

    def encode_captions(self, captions: list[str], text_encoders, n_windows: int = 1):
        """Training captions, plain text in ``n_windows`` windows: ([B, 77*n_windows, dim], pooled or None)."""
        windows = [[caption_windows(tok, ids, n_windows) for ids in token_ids(tok, captions)]
                   for tok in self.tokenizers]
        return self._encode(windows, text_encoders, weights=False)

    def encode_runs(self, runs: list[tuple[str, float]], text_encoders, *, min_windows: int = 1):
        """One prompt's (text, weight) runs: ([1, 77*n, dim], pooled or None), n = the windows the prompt needs."""
        per_tok = [prompt_windows(tok, runs) for tok in self.tokenizers]
        n = max(min_windows, *(w.count for w in per_tok))
        per_tok = [pad_windows(w, tok, n) for w, tok in zip(per_tok, self.tokenizers)]
        return self._encode([[w] for w in per_tok], text_encoders, weights=any(w.weighted for w in per_tok))

    def windows_needed(self, runs: list[tuple[str, float]]) -> int:
        return max(prompt_windows(tok, runs).count for tok in self.tokenizers)

    @torch.no_grad()
    def pipeline_embeddings(self, runs: list[tuple[str, float]], negative_runs: list[tuple[str, float]],
                            text_encoders, *, zero_empty_negative: bool = False, dtype=None) -> dict:
        """A diffusers pipeline's ``prompt_embeds`` / ``negative_prompt_embeds`` (+ SDXL's pooled ones) for a prompt
        and a negative prompt, padded to the same number of windows. ``zero_empty_negative``: an empty negative
        prompt is all zeros (SDXL's ``force_zeros_for_empty_prompt``, what its pipeline does)."""
        n = max(self.windows_needed(runs), self.windows_needed(negative_runs))
        emb, pooled = self.encode_runs(runs, text_encoders, min_windows=n)
        if zero_empty_negative and not "".join(t for t, w in negative_runs if (t, w) != BREAK_RUN).strip():
            neg, neg_pooled = torch.zeros_like(emb), (torch.zeros_like(pooled) if pooled is not None else None)
        else:
            neg, neg_pooled = self.encode_runs(negative_runs, text_encoders, min_windows=n)
        dtype = dtype or emb.dtype
        out = {"prompt_embeds": emb.to(dtype), "negative_prompt_embeds": neg.to(dtype)}
        if pooled is not None:
            out |= {"pooled_prompt_embeds": pooled.to(dtype), "negative_pooled_prompt_embeds": neg_pooled.to(dtype)}
        return out


def _device(module) -> torch.device:
    return next(module.parameters()).device
