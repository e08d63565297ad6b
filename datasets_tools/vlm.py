"""Vision-language captioners through transformers' own classes: Florence-2 task prompts and chat VLMs.

* ``Florence2Captioner``: ``Florence2ForConditionalGeneration`` (native in transformers 5) with one of its
  caption task prompts (``FLORENCE_TASKS``).
* ``ChatVLMCaptioner``: any ``AutoModelForImageTextToText`` whose processor has a chat template (Qwen2.5-VL,
  Qwen3-VL, SmolVLM, Idefics3, LLaVA and LLaVA-family models such as JoyCaption): the image and an instruction
  go in as one user turn through ``processor.apply_chat_template``, and only the newly generated tokens are read.

Both decode deterministically by default (``do_sample=False``), cap the answer's length and clean it up
(``clean_caption``: no "The image shows ..." lead-ins). torch and transformers are imported when a model loads;
``clean_caption`` is pure Python.
"""

from __future__ import annotations

import contextlib
import os
import re
import unicodedata
from pathlib import Path

from .captioners import (DEFAULT_FLORENCE_TASK, DEFAULT_INSTRUCTION, DEFAULT_MAX_WORDS, FLORENCE_TASKS, Captioner,
                         _check_model_path, florence_task, _pick_device, quiet_transformers)
from .errors import DatasetError, first_line

# --------------------------------------------------------------------------------------------- answer clean-up
_NOUNS = r"(?:image|picture|photo(?:graph)?|illustration|artwork|drawing|painting|render(?:ing)?|scene|screenshot)"
_VERBS = (r"(?:shows|depicts|features|displays|presents|portrays|showcases|captures|contains|illustrates|is\s+of"
          r"|is)")
_LEAD_INS = [re.compile(p, re.IGNORECASE) for p in (
    r"^(?:caption|answer|description)\s*:\s*",
    r"^(?:sure|certainly|of course)[,!.]?\s+(?:here\s+is\s+(?:a|the)\s+(?:caption|description)[^:]*:\s*)?",
    r"^(?:here\s+is|this\s+is)\s+(?:an?|the)\s+" + _NOUNS + r"\s+(?:of|showing|depicting|featuring)\s+",
    r"^(?:in\s+)?(?:this|the)\s+(?:\w+\s+)?" + _NOUNS + r"\s*,?\s+(?:we\s+(?:can\s+)?see|there\s+(?:is|are))\s+",
    r"^(?:this|the)\s+(?:\w+\s+)?" + _NOUNS + r"\s+" + _VERBS + r"\s+",
    r"^(?:in\s+)?(?:this|the)\s+" + _NOUNS + r"\s*,\s*",
)]
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def clean_caption(text: str, max_words: int = DEFAULT_MAX_WORDS, *, truncated: bool = False) -> str:
    """A model's answer as a training caption: one line of printable text (control characters and undecodable
    bytes dropped), no 'The image shows' lead-in, at most max_words words.

    ``truncated`` (the answer hit max_new_tokens) drops a trailing half sentence. A cap cuts at the last
    sentence end within the cap when there is one, else at a word. 0 means no word cap. '' stays ''.
    """
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in str(text).replace("\ufffd", ""))
    text = " ".join(text.replace("**", "").split())
    for _ in range(3):  # 'Sure! Here is a caption: The image shows ...' takes more than one pass
        before = text
        for pat in _LEAD_INS:
            text = pat.sub("", text, count=1).strip(" ,:;-").strip('"\u201c\u201d')
        if text == before:
            break
    if truncated:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends and ends[-1] < len(text):
            text = text[:ends[-1]]
    words = text.split()
    if max_words and len(words) > max_words:
        text = " ".join(words[:max_words])
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends and ends[-1] >= len(text) // 2:
            text = text[:ends[-1]]
        else:
            text = text.rstrip(",;:-")
    text = text.strip()
    return text[:1].upper() + text[1:] if text else ""


# --------------------------------------------------------------------------------------------- loading
def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


def _read_config(model: str, kind: str):
    import transformers

    p = Path(model)
    if p.is_dir() and not (p / "config.json").is_file():
        raise DatasetError(_not_transformers_folder(model, kind), path=model, field="--model")
    try:
        return transformers.AutoConfig.from_pretrained(model)
    except Exception as e:
        raise DatasetError(f"cannot read a transformers model config from {model} (the {kind} captioner needs a "
                           f"vision-language model folder or hub id): {first_line(e)}", path=model,
                           field="--model") from None


def _not_transformers_folder(model: str, kind: str) -> str:
    p = Path(model)
    if any(p.glob("*.onnx")) or (p / "selected_tags.csv").is_file():
        return f"{model} is a WD14 tagger folder (model.onnx), not a vision-language model: use --captioner wd14"
    return f"{model} is not a transformers model folder (no config.json) for the {kind} captioner"


def _needs_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is None


class _VLMBase(Captioner):
    """Shared loading: config check, processor, AutoModelForImageTextToText in the chosen dtype and device."""

    kind = "vlm"

    def __init__(self, model: str, *, device: str, dtype: str, max_new_tokens: int, num_beams: int,
                 max_words: int):
        model = _check_model_path(model, self.kind)
        if max_new_tokens < 1:
            raise DatasetError(f"max new tokens must be at least 1, got {max_new_tokens}", field="--max-new-tokens")
        if num_beams < 1:
            raise DatasetError(f"num beams must be at least 1, got {num_beams}", field="--num-beams")
        if max_words < 0:
            raise DatasetError(f"max words must be 0 (no cap) or more, got {max_words}", field="--max-words")
        import transformers

        with quiet_transformers():
            self.config = _read_config(model, self.kind)
            self.model_type = getattr(self.config, "model_type", "") or ""
            self.check_kind(model)
            self.device = _pick_device(device)
            self.dtype = _torch_dtype(dtype, self.device)
            try:
                self.processor = transformers.AutoProcessor.from_pretrained(model)
            except Exception as e:
                hint = ("; this model's processor needs torchvision (pip install torchvision)"
                        if _needs_torchvision() and ("torchvision" in str(e).lower() or "VIDEO_PROCESSOR" in str(e))
                        else "")
                raise DatasetError(f"cannot load the processor of {model}: {first_line(e)}{hint}", path=model,
                                   field="--model") from None
            if not hasattr(self.processor, "image_processor"):
                raise DatasetError(f"{model} has no image processor (a text-only model?): not a vision-language "
                                   f"captioner", path=model, field="--model")
            self.check_processor(model)
            try:
                self.model = transformers.AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype)
            except Exception as e:
                raise DatasetError(f"cannot load captioner {model}: {first_line(e)}", path=model,
                                   field="--model") from None
        self.model.to(self.device).eval()
        self.model_id = model
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.max_words = max_words
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else getattr(self.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def check_kind(self, model: str) -> None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        if self.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise DatasetError(f"{model} is a '{self.model_type}' model, not a vision-language model "
                               f"(transformers has no image-text-to-text class for it)", path=model, field="--model")

    def check_processor(self, model: str) -> None:
        pass

    def _to_device(self, inputs) -> dict:
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items() if hasattr(v, "to")}

    def _generate(self, inputs: dict):
        import torch

        with torch.inference_mode(), quiet_transformers():
            return self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                       do_sample=False)

    def _finish(self, rows, texts: list[str]) -> list[str]:
        out = []
        for row, text in zip(rows, texts):
            ended = bool(self.eos_ids & set(row.tolist()))
            out.append(clean_caption(text, self.max_words, truncated=not ended))
        return out

    @property
    def run_key(self) -> str:
        return f"{self.name} {self.model_id} {self.prompt_text} {self.max_words}"

    def describe(self) -> str:
        return f"{type(self.model).__name__} ({self.model_id}) on {self.device} in {str(self.dtype).split('.')[-1]}"


# --------------------------------------------------------------------------------------------- Florence-2
class Florence2Captioner(_VLMBase):
    """Florence-2 with a caption task prompt: '<CAPTION>', '<DETAILED_CAPTION>' or '<MORE_DETAILED_CAPTION>'."""

    name = kind = "florence2"

    def __init__(self, model: str, *, task: str = DEFAULT_FLORENCE_TASK, device: str = "auto", dtype: str = "auto",
                 max_new_tokens: int = 256, num_beams: int = 3, max_words: int = DEFAULT_MAX_WORDS):
        task = florence_task(task or DEFAULT_FLORENCE_TASK)
        if task not in FLORENCE_TASKS:
            raise DatasetError(f"Florence-2 task '{task}' is not a caption task; choose one of "
                               f"{', '.join(FLORENCE_TASKS)}", field="--task")
        self.task = task
        super().__init__(model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, num_beams=num_beams,
                         max_words=max_words)

    @property
    def prompt_text(self) -> str:
        return self.task

    def check_kind(self, model: str) -> None:
        if self.model_type != "florence2":
            other = ("use --captioner vlm" if _is_chat_type(self.model_type) else "use another --captioner")
            raise DatasetError(f"{model} is a '{self.model_type}' model, not Florence-2 ({other})", path=model,
                               field="--model")

    def caption_batch(self, images, paths=None):
        if not images:
            return []
        inputs = self.processor(images=list(images), text=[self.task] * len(images), return_tensors="pt",
                                padding=True)
        out = self._generate(self._to_device(inputs))
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        # BART starts decoding from </s>: only an end token after the first one means the answer finished.
        return self._finish([row[1:] for row in out], texts)


# --------------------------------------------------------------------------------------------- chat VLMs
def _is_chat_type(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in (
        "florence2", "blip", "blip-2", "git", "pix2struct", "kosmos-2", "udop", "vision-encoder-decoder")


class ChatVLMCaptioner(_VLMBase):
    """A chat vision-language model answering an instruction about each image, through its own chat template."""

    name = kind = "vlm"

    def __init__(self, model: str, *, prompt: str | None = None, device: str = "auto", dtype: str = "auto",
                 max_new_tokens: int = 200, num_beams: int = 1, max_words: int = DEFAULT_MAX_WORDS):
        self.instruction = " ".join((prompt or DEFAULT_INSTRUCTION).split())
        super().__init__(model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, num_beams=num_beams,
                         max_words=max_words)
        self.processor.tokenizer.padding_side = "left"  # decoder-only: the answer must follow the prompt directly
        self.image_token_id = next((getattr(self.config, a) for a in ("image_token_id", "image_token_index")
                                    if isinstance(getattr(self.config, a, None), int)), None)

    @property
    def prompt_text(self) -> str:
        return self.instruction

    def check_processor(self, model: str) -> None:
        template = getattr(self.processor, "chat_template", None) or getattr(
            getattr(self.processor, "tokenizer", None), "chat_template", None)
        if not template:
            hint = ("use --captioner blip" if self.model_type in ("blip", "blip-2", "git")
                    else "use --captioner florence2" if self.model_type == "florence2"
                    else "add the model's chat_template.jinja to the folder")
            raise DatasetError(f"{model} has no chat template, so it cannot take an instruction ({hint})",
                               path=model, field="--model")

    def conversation(self, image) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": self.instruction}]}]

    def caption_batch(self, images, paths=None):
        if not images:
            return []
        inputs = self.processor.apply_chat_template(
            [self.conversation(im) for im in images], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True})
        ids = inputs["input_ids"]
        if self.image_token_id is not None and not bool((ids == self.image_token_id).any(dim=1).all()):
            raise DatasetError(f"the chat template of {self.model_id} put no image token into the prompt; the "
                               f"model would not see the picture", path=self.model_id, field="--model")
        out = self._generate(self._to_device(inputs))
        new = out[:, ids.shape[1]:]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        return self._finish(new, texts)


def vlm_captioner(model: str | os.PathLike, **opts) -> Captioner:
    """The 'vlm' captioner for a model: Florence-2 folders get the Florence path (their task prompt), others chat."""
    path = _check_model_path(model, "vlm")
    with contextlib.suppress(DatasetError):
        with quiet_transformers():
            if getattr(_read_config(path, "vlm"), "model_type", "") == "florence2":
                florence = {k: v for k, v in opts.items() if k != "prompt"}
                return Florence2Captioner(path, **florence)
    return ChatVLMCaptioner(path, **opts)
