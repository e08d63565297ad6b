"""A1111 LoRA syntax: `<lora:name:te:unet:dyn>` tags in prompts and `FILE:weight` arguments, parsed and stripped."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

# A1111's extra-network pattern (modules/extra_networks.py): `<kind:args>`, args split at ':'.
_TAG = re.compile(r"<(\w+):([^>]+)>")
#: Tag kinds that name a LoRA (A1111 1.5+ treats `lyco` as an alias of `lora`).
LORA_TAG_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    """One LoRA request: a name or path with text-encoder and UNet multipliers (A1111 semantics)."""
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    dyn: int | None = None  # keep only the first `dyn` ranks (DyLoRA), None = all
    text: str = ""          # the tag or argument as written

    @property
    def weight(self) -> float:
        """The single weight when te and UNet agree (else the UNet weight)."""
        return self.unet_weight

    def to_tag(self, name: str | None = None) -> str:
        """The A1111 tag that reproduces this request, e.g. `<lora:style:0.8>` or `<lora:style:0.5:1>`."""
        parts = [name or self.name, _num(self.te_weight)]
        if self.unet_weight != self.te_weight or self.dyn is not None:
            parts.append(_num(self.unet_weight))
        if self.dyn is not None:
            parts.append(str(self.dyn))
        return "<lora:" + ":".join(parts) + ">"


def _num(x: float) -> str:
    return f"{x:g}"


def _float(value: str, what: str, where: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise UserError(f"{what} '{value}' in {where} is not a number") from None
    if not math.isfinite(x):
        raise UserError(f"{what} '{value}' in {where} is not a finite number")
    return x


def _weights(items: list[str], where: str) -> tuple[float, float, int | None]:
    """A1111's rules (extra_networks_lora.py): positional te, unet (defaults to te), dyn; or te=/unet=/dyn=."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if eq:
            key = key.strip().lower()
            if key not in ("te", "unet", "dyn"):
                raise UserError(f"unknown setting '{key}=' in {where} (use te=, unet= or dyn=)")
            named[key] = value.strip()
        else:
            positional.append(item.strip())
    if len(positional) > 3:
        raise UserError(f"too many values in {where} (at most te, unet and dyn)")
    te = _float(positional[0], "weight", where) if positional else 1.0
    te = _float(named["te"], "te weight", where) if "te" in named else te
    unet = _float(positional[1], "unet weight", where) if len(positional) > 1 else te
    unet = _float(named["unet"], "unet weight", where) if "unet" in named else unet
    dyn_text = named.get("dyn", positional[2] if len(positional) > 2 else None)
    dyn = None
    if dyn_text is not None:
        try:
            dyn = int(dyn_text)
        except ValueError:
            raise UserError(f"dyn '{dyn_text}' in {where} is not a whole number") from None
        if dyn < 1:
            raise UserError(f"dyn '{dyn_text}' in {where} must be at least 1")
    return te, unet, dyn


def parse_prompt(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split a prompt into the text the model sees and its `<lora:...>` tags (in order).

    Tags are removed the way A1111 removes them (replaced by nothing); runs of spaces left behind are
    collapsed, which does not change CLIP's tokens. Other extra-network tags (`<hypernet:...>`) are left as is.
    """
    tags: list[LoraTag] = []

    def found(m: re.Match) -> str:
        if m.group(1).lower() not in LORA_TAG_KINDS:
            return m.group(0)
        items = m.group(2).split(":")
        name = items[0].strip()
        if not name:
            raise UserError(f"prompt tag {m.group(0)} has no LoRA name")
        te, unet, dyn = _weights(items[1:], f"prompt tag {m.group(0)}")
        tags.append(LoraTag(name, te, unet, dyn, m.group(0)))
        return ""

    text = _TAG.sub(found, prompt)
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    return text, tags


def strip_lora_tags(prompt: str) -> str:
    """The prompt without its `<lora:...>` tags."""
    return parse_prompt(prompt)[0]


def parse_lora_arg(text: str) -> LoraTag:
    """Parse a command-line LoRA: `PATH_OR_NAME`, `PATH:W`, `PATH:TE:UNET`, `PATH:te=0.5:unet=1`.

    The path part ends at the first `.safetensors` (or at the longest prefix that exists on disk), so
    paths with colons work; without either, the name ends at the first colon.
    """
    text = text.strip()
    if not text:
        raise UserError("empty --lora value (use FILE or FILE:WEIGHT)")
    if Path(text).exists() or ":" not in text:
        return LoraTag(text, text=text)
    parts = text.split(":")
    cut = 1
    for i in range(len(parts), 0, -1):  # longest path-like prefix wins
        head = ":".join(parts[:i])
        if head.lower().endswith(".safetensors") or Path(head).exists():
            cut = i
            break
    name = ":".join(parts[:cut])
    if not name:
        raise UserError(f"--lora {text}: no file or name before ':'")
    te, unet, dyn = _weights(parts[cut:], f"--lora {text}")
    return LoraTag(name, te, unet, dyn, text)


def a1111_alias(name: str) -> str:
    """The name as A1111 writes it in `Lora hashes` (':' and ',' removed)."""
    return name.replace(":", "").replace(",", "")


# ------------------------------------------------------------------------------------ A1111 attention syntax

#: A1111's emphasis factors: `(text)` multiplies the attention weight by 1.1, `[text]` divides it by 1.1.
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
#: The word that ends a 75-token window early (the rest of the prompt starts a new window).
BREAK = "BREAK"

_ATTENTION_TOKEN = re.compile(r"""
    \\[()\[\]\\]              # an escaped bracket or backslash: the character itself
  | \\                        # a lone backslash: itself
  | [(\[]                     # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)    # ':1.2)': closes a round bracket with an explicit weight
  | [)\]]                     # a closing bracket
  | [^\\()\[\]:]+             # plain text
  | :                         # a colon that is not a weight
""", re.VERBOSE)
_BREAK_WORD = re.compile(rf"\s*\b{BREAK}\b\s*")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A prompt in A1111's attention syntax as (text, weight) runs, in order; a `BREAK` is the run (BREAK, -1.0).

    `(a)` x1.1, `((a))` x1.21, `[a]` /1.1, `(a:1.5)` x1.5 (nesting multiplies), `\\(` a literal bracket.
    A bracket left open applies to the rest of the prompt; a closing bracket with nothing open, or a weight that
    is not a number, is plain text. Neighbouring runs of the same weight are joined. `<lora:...>` tags are not
    handled here (take them out with :func:`parse_prompt` first).
    """
    runs: list[list] = []          # [text, weight] pairs; weights are multiplied in place when a bracket closes
    open_round: list[int] = []     # index in runs where each open bracket began
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION_TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            runs.append([tok[1], 1.0])
        elif tok == "(":
            open_round.append(len(runs))
        elif tok == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round and _is_number(weight):
            scale(open_round.pop(), float(weight))
        elif tok == ")" and open_round:
            scale(open_round.pop(), ROUND_FACTOR)
        elif tok == "]" and open_square:
            scale(open_square.pop(), SQUARE_FACTOR)
        else:
            pieces = _BREAK_WORD.split(tok)
            for k, piece in enumerate(pieces):
                if k:
                    runs.append([BREAK, -1.0])
                if piece:
                    runs.append([piece, 1.0])
    for start in open_round:
        scale(start, ROUND_FACTOR)
    for start in open_square:
        scale(start, SQUARE_FACTOR)
    joined: list[tuple[str, float]] = []
    for t, w in runs:
        if joined and w != -1.0 and joined[-1][1] == w and joined[-1][0] != BREAK:
            joined[-1] = (joined[-1][0] + t, w)
        else:
            joined.append((t, w))
    return joined or [("", 1.0)]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# ------------------------------------------------------------------------------------ sample prompt options

@dataclass(frozen=True)
class SamplePrompt:
    """One line of ``sample.prompts``: the prompt and the kohya options it sets (None = the [sample] setting)."""
    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None


#: kohya's per-prompt options (sd-scripts' sample prompt files) -> (SamplePrompt field, generation setting).
SAMPLE_OPTIONS = {"n": ("negative", "negative"), "w": ("width", "width"), "h": ("height", "height"),
                  "s": ("steps", "steps"), "l": ("guidance_scale", "guidance_scale"), "d": ("seed", "seed"),
                  "ss": ("sampler", "sampler")}


def parse_sample_prompt(line: str, where: str = "sample.prompts") -> SamplePrompt:
    """``a castle --n blurry --w 768 --h 512 --s 28 --l 6.5 --d 42 --ss euler_a`` -> SamplePrompt.

    The prompt is the text before the first `` --``; each option runs to the next `` --``. Values are checked
    against the generation settings' ranges (trainer.generate.settings); samplers are named as in
    trainer.generate.samplers (the key or the A1111 label). A bad option raises a one-line UserError naming
    ``where`` (the prompt line) and the option."""
    from trainer.config.schema import check_value
    from trainer.generate.samplers import SAMPLERS
    from trainer.generate.settings import GENERATE_FIELDS
    text = f" {line}"
    head, *opts = text.split(" --")
    values: dict = {}
    known = ", ".join(f"--{k}" for k in SAMPLE_OPTIONS)
    for part in opts:
        name, _, raw = part.partition(" ")
        name, raw = name.strip(), raw.strip()
        if name.lower() not in SAMPLE_OPTIONS:
            raise UserError(f"{where}: unknown option --{name} (use {known})", field="sample.prompts")
        attr, setting = SAMPLE_OPTIONS[name.lower()]
        fi = GENERATE_FIELDS[setting]
        if fi.type is str and fi.choices:
            by_name = {k.lower(): k for k in SAMPLERS} | {v.lower(): k for k, v in SAMPLERS.items()}
            if raw.lower() not in by_name:
                raise UserError(f"{where}: --{name} {raw!r} is not a sampler (use one of {', '.join(SAMPLERS)})",
                                field="sample.prompts")
            values[attr] = by_name[raw.lower()]
            continue
        if fi.type is not str and not raw:
            raise UserError(f"{where}: --{name} needs a value", field="sample.prompts")
        try:
            value = raw if fi.type is str else (float(raw) if fi.type is float else _whole(raw))
        except ValueError:
            kind = "a number" if fi.type is float else "a whole number"
            raise UserError(f"{where}: --{name} {raw!r} is not {kind}", field="sample.prompts") from None
        try:
            values[attr] = check_value(fi, value)
        except UserError as e:
            reason = str(e).split(": ", 1)[-1]
            raise UserError(f"{where}: --{name} {reason}", field="sample.prompts") from None
    return SamplePrompt(head.strip(), **values)


def _whole(raw: str) -> int:
    f = float(raw)
    if not f.is_integer():
        raise ValueError(raw)
    return int(f)


def parse_sample_prompts(lines: list[str]) -> list[SamplePrompt]:
    """Every ``sample.prompts`` line parsed; the first bad one is a UserError naming its line number and text."""
    out = []
    for i, line in enumerate(lines, 1):
        short = line if len(line) <= 60 else line[:57] + "..."
        out.append(parse_sample_prompt(line, f"sample.prompts line {i} ({short!r})"))
    return out
