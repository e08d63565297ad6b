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
