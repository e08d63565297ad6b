"""Captioners behind one interface (template, transformers image-to-text, WD14 ONNX tagger, Florence-2, chat
vision-language models) and caption_folder.

The captioners are described once, in ``REGISTRY`` (name -> help, aliases, whether a model is needed, the options
it takes): ``lorastudio prepare --captioner`` takes its choices, help and options from it and the web app its
dropdown (``CAPTIONERS``, the names in order), so a captioner added here appears in both. The Florence-2 and chat
VLM classes live in ``datasets_tools.vlm``."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from .captions import BACKUP_DIR, CaptionWriter, atomic_write_text, image_caption_pairs, prefix_transform
from .errors import DatasetError, first_line
from .folder import Problem, check_folder, repeats_for
from .images import ImageError, load_rgb


@dataclass(frozen=True)
class CaptionerInfo:
    name: str
    help: str
    aliases: tuple[str, ...] = ()
    needs_model: bool = True
    #: The keyword options ``get_captioner`` passes on to this captioner (the CLI passes exactly these).
    options: tuple[str, ...] = ()


_HF = ("device", "dtype", "max_new_tokens", "num_beams")
REGISTRY: dict[str, CaptionerInfo] = {c.name: c for c in (
    CaptionerInfo("template", "offline captions from a template over {trigger}, {name} (file name) and {folder}",
                  needs_model=False, options=("template", "trigger", "root")),
    CaptionerInfo("blip", "any transformers image-to-text model (BLIP, BLIP-2, GIT, ...): a folder or hub id",
                  aliases=("blip2", "git", "transformers"), options=_HF + ("prompt",)),
    CaptionerInfo("wd14", "a WD14 booru tagger (model.onnx + selected_tags.csv): a folder, .onnx file or hub id",
                  aliases=("wd", "tagger"),
                  options=("general_threshold", "character_threshold", "blacklist", "underscores_to_spaces",
                           "include_rating", "device")),
    CaptionerInfo("florence2", "Florence-2 sentences from a task prompt (<CAPTION>, <DETAILED_CAPTION>, "
                               "<MORE_DETAILED_CAPTION>): a folder or hub id",
                  aliases=("florence", "florence-2"), options=_HF + ("task", "max_words")),
    CaptionerInfo("vlm", "a chat vision-language model (Qwen2.5-VL, Qwen3-VL, SmolVLM, Idefics3, LLaVA, "
                         "JoyCaption, ...) answering an instruction: a folder or hub id",
                  aliases=("chat-vlm", "qwen-vl", "qwen2.5-vl", "qwen3-vl", "smolvlm", "idefics3", "llava",
                           "joycaption"), options=_HF + ("prompt", "max_words")),
)}
#: The captioner names, in menu order (``choices=list(CAPTIONERS)``; ``CAPTIONERS[0]`` is the default).
CAPTIONERS: tuple[str, ...] = tuple(REGISTRY)
#: Where a captioner model runs, and in which precision ('auto': float32 on CPU, bfloat16/float16 on a GPU).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
#: Florence-2's caption task prompts, shortest answer first, and the one used by default.
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_FLORENCE_TASK = "<DETAILED_CAPTION>"


def florence_task(name: str) -> str:
    """'more detailed caption', 'DETAILED_CAPTION' or '<CAPTION>' -> the task prompt ('<...>', upper case)."""
    core = "_".join(str(name).strip().strip("<>").replace("-", " ").upper().split())
    return f"<{core}>"


#: What a chat VLM is asked by default, and the longest caption kept (words; 0: no cap).
DEFAULT_INSTRUCTION = ("Write one paragraph describing this image for an image-generation training caption: the "
                       "subject, the art style and the medium. Describe only what is visible; do not begin with "
                       "'The image shows' or 'This image depicts'.")
DEFAULT_MAX_WORDS = 120
Progress = Callable[[int, int], None]


@contextlib.contextmanager
def quiet_transformers():
    """transformers' notes and weight-loading bars off while a captioner loads or generates (they would bury our
    own progress bar and one-line errors); the previous settings come back afterwards."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def captioner_name(name: str | None) -> str:
    """The registry name for a name or alias ('BLIP2' -> 'blip'); a one-line DatasetError for anything else."""
    low = (name or "").strip().lower()
    for info in REGISTRY.values():
        if low == info.name or low in info.aliases:
            return info.name
    raise DatasetError(f"unknown captioner '{name}'; choose one of {', '.join(CAPTIONERS)}", field="--captioner")


class Captioner:
    """Turns a batch of RGB images into captions. ``needs_pixels`` False means paths alone are enough."""

    name = "captioner"
    needs_pixels = True
    device = "cpu"

    def caption_batch(self, images: list[Image.Image], paths: list[Path] | None = None) -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    @property
    def run_key(self) -> str:
        """What makes two runs the same run (an interrupted --overwrite run resumes only under the same key)."""
        return self.describe()


def _looks_like_path(model: str) -> bool:
    # Hub ids are 'owner/name'; anything absolute, relative-dotted, home-based or existing is a path.
    return (os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
            or model.count("/") > 1 or "\\" in model)


def _check_model_path(model: str | os.PathLike | None, kind: str) -> str:
    if not model:
        raise DatasetError(f"the {kind} captioner needs --model (a local folder or a hub id)", field="--model")
    model = str(model)
    if _looks_like_path(model) and not os.path.exists(os.path.expanduser(model)):
        raise DatasetError(f"captioner model not found: {model}", path=model, field="--model")
    return os.path.expanduser(model) if _looks_like_path(model) else model


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _auto_dtype(device: str):
    """The dtype a model runs in on DEVICE when none is asked for: fp16 on CUDA, fp32 elsewhere."""
    import torch

    return torch.float16 if device == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------- template
_NUM_PREFIX = re.compile(r"^\d+_")
_TRAILING_NUM = re.compile(r"[\s_\-(]*\d+\)?$")


def clean_name(name: str) -> str:
    """'10_zxq_style' -> 'zxq style', 'my-cat_003' -> 'my cat': kohya repeat prefix and counters dropped."""
    name = _NUM_PREFIX.sub("", name)
    name = _TRAILING_NUM.sub("", name) or name
    return " ".join(re.sub(r"[_\-]+", " ", name).split())


class TemplateCaptioner(Captioner):
    """Offline captions from a template over {trigger}, {name} (file name) and {folder} (its folder)."""

    name = "template"
    needs_pixels = False

    def __init__(self, template: str = "{name}", trigger: str | None = None, root: str | os.PathLike | None = None):
        for key in re.findall(r"{(\w*)}", template):
            if key not in ("trigger", "name", "folder"):
                raise DatasetError(f"template '{template}' uses {{{key}}}; use {{trigger}}, {{name}} or {{folder}}",
                                   field="--template")
        self.template = template
        self.trigger = trigger or ""
        self.root = Path(root) if root else None

    def caption_batch(self, images, paths=None):
        if paths is None:
            raise DatasetError("the template captioner needs the image paths")
        out = []
        for p in paths:
            p = Path(p)
            folder = p.parent.name
            if self.root is not None:
                _, subset = repeats_for(p, self.root)
                folder = Path(subset).name if subset != "." else self.root.name
            text = self.template.format(trigger=self.trigger, name=clean_name(p.stem), folder=clean_name(folder))
            out.append(", ".join(t.strip() for t in text.split(",") if t.strip()))
        return out

    @property
    def run_key(self) -> str:
        return f"template {self.template} {self.trigger}"


# ----------------------------------------------------------------------------------------------- transformers
class TransformersCaptioner(Captioner):
    """Any transformers image-to-text model (BLIP, BLIP-2, GIT, ...) through AutoProcessor + AutoModel."""

    name = "blip"

    def __init__(self, model: str, *, device: str = "auto", prompt: str | None = None, max_new_tokens: int = 40,
                 num_beams: int = 3, dtype: str = "auto"):
        model = _check_model_path(model, "blip")
        import torch
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        with quiet_transformers():
            try:
                config = transformers.AutoConfig.from_pretrained(model)
            except Exception as e:
                raise DatasetError(f"cannot read a transformers model config from {model} (expected an "
                                   f"image-to-text model folder or hub id): {first_line(e)}", path=model,
                                   field="--model") from None
            model_type = getattr(config, "model_type", "")
            if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
                raise DatasetError(f"{model} is a '{model_type}' model, not an image-to-text captioner "
                                   f"(BLIP, BLIP-2, GIT, ...)", path=model, field="--model")
            self.device = _pick_device(device)
            if dtype == "auto":
                torch_dtype = _auto_dtype(self.device)
            else:
                torch_dtype = getattr(torch, dtype)
            try:
                self.processor = transformers.AutoProcessor.from_pretrained(model)
                self.model = transformers.AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype)
            except Exception as e:
                raise DatasetError(f"cannot load captioner {model}: {first_line(e)}", path=model,
                                   field="--model") from None
        self.model.to(self.device).eval()
        self.dtype = torch_dtype
        self.model_id = model
        self.prompt = prompt
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}

    def caption_batch(self, images, paths=None):
        import torch

        kwargs = {"images": list(images), "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if hasattr(v, "to")}
        with torch.inference_mode(), quiet_transformers():
            out = self.model.generate(**inputs, **self.generate_kwargs)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        result = []
        for t in texts:
            t = " ".join(t.split())
            # Decoder-only models (GIT, BLIP-2 with a prompt) echo the prompt before the caption.
            if self.prompt and t.lower().startswith(self.prompt.lower()):
                t = t[len(self.prompt):].strip()
            result.append(t)
        return result

    def describe(self) -> str:
        return f"{type(self.model).__name__} ({self.model_id}) on {self.device}"

    @property
    def run_key(self) -> str:
        return f"{self.name} {self.model_id} {self.prompt} {self.generate_kwargs}"


# ----------------------------------------------------------------------------------------------- WD14 tagger
# Booru kaomoji tags whose underscores are part of the face (same list as SmilingWolf's wd-tagger demo).
KAOMOJIS = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
            "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}
RATING, GENERAL, CHARACTER = 9, 0, 4


@dataclass
class TagSet:
    names: list[str]
    categories: list[int]
    general: list[int] = field(default_factory=list)
    character: list[int] = field(default_factory=list)


def read_tags_csv(path: Path) -> TagSet:
    """selected_tags.csv: columns tag_id,name,category,count; category 0 general, 4 character, 9 rating."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DatasetError(f"cannot read tag list {path}: {e.strerror or e}", path=str(path)) from None
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise DatasetError(f"{path} is not a WD14 tag list (needs 'name' and 'category' columns)", path=str(path))
    names, cats = [], []
    for n, row in enumerate(rows, start=2):
        try:
            cats.append(int(row["category"]))
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: line {n} has category '{row['category']}', expected a number",
                               path=str(path)) from None
        names.append(row["name"])
    tags = TagSet(names, cats)
    tags.general = [i for i, c in enumerate(cats) if c == GENERAL]
    tags.character = [i for i, c in enumerate(cats) if c == CHARACTER]
    return tags


def _resolve_wd14_files(model: str) -> tuple[Path, Path]:
    p = Path(model)
    if p.is_file():
        if p.suffix.lower() != ".onnx":
            raise DatasetError(f"{model} is not an ONNX file (the wd14 captioner needs model.onnx and "
                               f"selected_tags.csv)", path=model, field="--model")
        onnx_path, csv_path = p, p.with_name("selected_tags.csv")
    elif p.is_dir():
        onnx_files = sorted(p.glob("*.onnx"))
        onnx_path = p / "model.onnx" if (p / "model.onnx").is_file() else (onnx_files[0] if onnx_files else None)
        if onnx_path is None:
            raise DatasetError(f"no model.onnx in {model}: not a WD14 tagger folder", path=model, field="--model")
        csv_path = p / "selected_tags.csv"
    else:  # a hub id such as SmilingWolf/wd-vit-tagger-v3
        try:
            from huggingface_hub import hf_hub_download

            onnx_path = Path(hf_hub_download(model, "model.onnx"))
            csv_path = Path(hf_hub_download(model, "selected_tags.csv"))
        except Exception as e:
            raise DatasetError(f"cannot get WD14 tagger '{model}' (model.onnx + selected_tags.csv): "
                               f"{first_line(e)}", path=model, field="--model") from None
    if not csv_path.is_file():
        raise DatasetError(f"selected_tags.csv not found next to {onnx_path}", path=str(csv_path), field="--model")
    return onnx_path, csv_path


class WD14Captioner(Captioner):
    """SmilingWolf-style booru tagger: NHWC float32 BGR 0-255 input padded white to square, sigmoid outputs."""

    name = "wd14"

    def __init__(self, model: str, *, general_threshold: float = 0.35, character_threshold: float = 0.85,
                 blacklist: list[str] | None = None, underscores_to_spaces: bool = True, include_rating: bool = False,
                 device: str = "auto"):
        model = _check_model_path(model, "wd14")
        onnx_path, csv_path = _resolve_wd14_files(model)
        self.tags = read_tags_csv(csv_path)
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            wanted.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=wanted)
        except Exception as e:
            raise DatasetError(f"cannot load ONNX model {onnx_path}: {first_line(e)}", path=str(onnx_path),
                               field="--model") from None
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise DatasetError(f"{onnx_path} does not look like a WD14 tagger: input shape {shape}, expected "
                               f"[batch, size, size, 3]", path=str(onnx_path), field="--model")
        out_shape = self.session.get_outputs()[0].shape
        if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != len(self.tags.names)):
            raise DatasetError(f"{onnx_path} outputs {out_shape} but {csv_path} lists {len(self.tags.names)} tags",
                               path=str(onnx_path), field="--model")
        self.input_name = inp.name
        self.size = int(shape[1])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None  # old exports fix the batch to 1
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device != "cuda":
            print("warning: onnxruntime has no CUDA provider here (install onnxruntime-gpu); tagging on CPU",
                  file=sys.stderr)
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.blacklist = {_norm(t) for t in (blacklist or []) if t.strip()}
        self.underscores_to_spaces = underscores_to_spaces
        self.include_rating = include_rating
        self.model_path = onnx_path

    def preprocess(self, img: Image.Image):
        import numpy as np

        img = img.convert("RGB")
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        if side != self.size:
            canvas = canvas.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(canvas, dtype=np.float32)[:, :, ::-1]  # the taggers were trained on BGR

    def _tag_name(self, name: str) -> str:
        if self.underscores_to_spaces and name not in KAOMOJIS:
            return name.replace("_", " ")
        return name

    def tags_for(self, probs) -> list[str]:
        chosen: list[tuple[float, str]] = []
        for i in self.tags.character:
            if probs[i] >= self.character_threshold:
                chosen.append((2.0 + float(probs[i]), self.tags.names[i]))  # characters first
        for i in self.tags.general:
            if probs[i] >= self.general_threshold:
                chosen.append((float(probs[i]), self.tags.names[i]))
        if self.include_rating:
            ratings = [i for i, c in enumerate(self.tags.categories) if c == RATING]
            if ratings:
                best = max(ratings, key=lambda i: probs[i])
                chosen.append((-1.0, self.tags.names[best]))
        chosen.sort(key=lambda t: -t[0])
        out = []
        for _, name in chosen:
            if _norm(name) in self.blacklist:
                continue
            out.append(self._tag_name(name))
        return out

    def caption_batch(self, images, paths=None):
        import numpy as np

        if not images:
            return []
        arr = np.stack([self.preprocess(im) for im in images])
        step = self.fixed_batch or len(arr)
        probs = np.concatenate([self.session.run(None, {self.input_name: arr[i:i + step]})[0]
                                for i in range(0, len(arr), step)])
        return [", ".join(self.tags_for(p)) for p in probs]

    def describe(self) -> str:
        return f"WD14 tagger {self.model_path} on {self.device} ({self.session.get_providers()[0]})"

    @property
    def run_key(self) -> str:
        return (f"wd14 {self.model_path} {self.general_threshold} {self.character_threshold} "
                f"{sorted(self.blacklist)} {self.underscores_to_spaces} {self.include_rating}")


def _norm(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())


def check_captioner_args(name: str, model: str | None) -> None:
    """Cheap checks (no model loading) so a bad --model fails before any other work."""
    kind = captioner_name(name)
    if not REGISTRY[kind].needs_model:
        return
    model = _check_model_path(model, (name or "").lower())
    p = Path(model)
    if kind == "wd14":
        if p.exists():
            _resolve_wd14_files(model)
    elif p.is_dir() and not (p / "config.json").is_file():
        if any(p.glob("*.onnx")) or (p / "selected_tags.csv").is_file():
            raise DatasetError(f"{model} is a WD14 tagger folder (model.onnx), not a transformers model: use "
                               f"--captioner wd14", path=model, field="--model")
        raise DatasetError(f"{model} is not a transformers model folder (no config.json)", path=model,
                           field="--model")


def captioner_options(name: str, **opts) -> dict:
    """The options among ``opts`` that captioner ``name`` takes (its ``CaptionerInfo.options``), None dropped:
    front-ends pass every option they have and this picks, so no front-end lists which captioner takes what."""
    allowed = REGISTRY[captioner_name(name)].options
    return {k: v for k, v in opts.items() if k in allowed and v is not None}


def get_captioner(name: str, model: str | None = None, **opts) -> Captioner:
    """Captioner by name: 'template' (offline), 'blip' (transformers image-to-text), 'wd14' (ONNX tagger),
    'florence2' (Florence-2 task prompts), 'vlm' (chat vision-language models; a Florence-2 folder works too)."""
    kind = captioner_name(name)
    if kind == "template":
        return TemplateCaptioner(**opts)
    if kind == "blip":
        return TransformersCaptioner(model, **opts)
    if kind == "wd14":
        return WD14Captioner(model, **opts)
    from .vlm import Florence2Captioner, vlm_captioner

    if kind == "florence2":
        return Florence2Captioner(model, **opts)
    return vlm_captioner(model, **opts)


# ----------------------------------------------------------------------------------------------- folder
#: An interrupted --overwrite run's progress (which captions it already wrote), so a rerun continues there.
PROGRESS_FILE = "caption-progress.json"


@dataclass
class CaptionRun:
    written: list[str] = field(default_factory=list)  # caption files written (relative to root)
    kept: list[str] = field(default_factory=list)  # existing captions left alone (no overwrite)
    skipped: list[Problem] = field(default_factory=list)  # unusable images (the scan's verdict): no caption
    not_captioned: list[Problem] = field(default_factory=list)  # the model could not read it, or answered nothing
    resumed: list[str] = field(default_factory=list)  # written by the interrupted run this one continued
    backup: str | None = None

    @property
    def failed(self) -> list[Problem]:
        """The skipped images (the older name, which front-ends read)."""
        return self.skipped

    def summary(self) -> str:
        from .scan import describe_skipped  # numpy: not at import time (the CLI imports the registry above)

        text = f"captioned {len(self.written)} image(s), kept {len(self.kept)} existing caption(s)"
        if self.resumed:
            text += f" (continued an interrupted run: {len(self.resumed)} were captioned by it)"
        if self.backup:
            text += f"; backup: {self.backup}"
        if self.skipped:
            text += "; " + describe_skipped(self.skipped)
        if self.not_captioned:
            text += f"; {len(self.not_captioned)} not captioned (no file written): " + ", ".join(
                p.path for p in self.not_captioned[:10]) + (" ..." if len(self.not_captioned) > 10 else "")
        return text


def caption_todo(root: str | os.PathLike, *, overwrite: bool = False, caption_extension: str = ".txt",
                 unusable: dict[str, Problem] | None = None) -> tuple[list[tuple[Path, Path]], CaptionRun]:
    """(image, caption file) pairs a captioning run would write, and a CaptionRun holding what it keeps and
    skips. Unusable images (``scan.unusable_files``, the scan's own verdict; pass it when already known) are
    skipped before anything else, so they get no caption even with overwrite."""
    from .scan import unusable_files

    root = check_folder(root).resolve()
    if unusable is None:
        unusable = unusable_files(root, caption_extension=caption_extension)
    run = CaptionRun()
    todo = []
    for img, cap in image_caption_pairs(root, caption_extension):
        bad = unusable.get(img.relative_to(root).as_posix())
        if bad is not None:
            run.skipped.append(bad)
        elif cap.exists() and not overwrite:
            run.kept.append(cap.relative_to(root).as_posix())
        else:
            todo.append((img, cap))
    return todo, run


class _Progress:
    """The progress file of an --overwrite run: {key, done}; rewritten atomically after every batch, removed
    when the run completes. Only a run with the same key (captioner, model, prompt, trigger) resumes from it."""

    def __init__(self, root: Path, key: str):
        self.path = root / BACKUP_DIR / PROGRESS_FILE
        self.key = key
        self.done: list[str] = []

    def previous(self) -> set[str]:
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        if not isinstance(state, dict) or state.get("key") != self.key:
            return set()
        self.done = [d for d in state.get("done", []) if isinstance(d, str)]
        return set(self.done)

    def add(self, rels: list[str]) -> None:
        self.done.extend(rels)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"key": self.key, "done": self.done}, ensure_ascii=False))

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def _caption_one_by_one(captioner: Captioner, images, paths) -> list[str | Exception]:
    out: list[str | Exception] = []
    for im, p in zip(images or [None] * len(paths), paths):
        try:
            out.extend(captioner.caption_batch([im] if im is not None else [], [p]))
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - the library's own error names the image's problem
            out.append(e)
    return out


def _caption_chunk(captioner: Captioner, images, paths) -> list[str | Exception]:
    """Captions for a batch, or per image the error it raised. A DatasetError is the model's problem, not the
    image's: it stops the run. A batch that fails is retried image by image, so one picture the model cannot
    read costs only its own caption; every image failing the same way is the model's problem too."""
    try:
        texts = captioner.caption_batch(images, paths)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001
        if len(paths) == 1:
            return [e]
        texts = _caption_one_by_one(captioner, images, paths)
        errors = {first_line(t) for t in texts if isinstance(t, Exception)}
        if len(errors) == 1 and all(isinstance(t, Exception) for t in texts):
            raise DatasetError(f"captioner {captioner.describe()} failed on every image of a batch: "
                               f"{errors.pop()}", field="--model") from None
        return texts
    if len(texts) != len(paths):
        raise DatasetError(f"captioner {captioner.name} returned {len(texts)} captions for {len(paths)} images")
    return list(texts)


def caption_folder(root: str | os.PathLike, captioner: Captioner, *, trigger: str | None = None,
                   overwrite: bool = False, batch_size: int = 8, progress: Progress | None = None,
                   caption_extension: str = ".txt", unusable: dict[str, Problem] | None = None,
                   resume: bool = True) -> CaptionRun:
    """Caption every usable image under root that has no caption (all of them with overwrite).

    Images the scan calls unusable (truncated, empty, not an image, unreadable) get no caption and are listed
    in the run's ``skipped`` (and its summary). An image the model cannot read, or one it answers with nothing,
    gets no caption file either and is listed in ``not_captioned`` with the reason; the rest are captioned.
    Captions are written batch by batch as they finish (an interrupted run keeps them), atomically, under one
    backup so one undo reverts the run. Rerunning an interrupted run continues where it stopped: without
    overwrite the captions it wrote are kept like any others; with overwrite (and ``resume``) the progress file
    of the same run tells which images it already did. The trigger goes first in each caption.
    ``progress(done, total)`` replaces the terminal progress bar (the GUI passes one).
    """
    root = check_folder(root).resolve()
    if batch_size < 1:
        raise DatasetError(f"batch size must be at least 1, got {batch_size}", field="--caption-batch-size")
    if isinstance(captioner, TemplateCaptioner) and captioner.root is None:
        captioner.root = root  # {folder} then means the dataset sub-set ('10_zxq' -> 'zxq'), as in the CLI
    todo, run = caption_todo(root, overwrite=overwrite, caption_extension=caption_extension, unusable=unusable)
    state = _Progress(root, f"{captioner.run_key} | trigger={trigger or ''} | {caption_extension}") \
        if overwrite else None
    if state is not None and resume:
        already = state.previous()
        left = []
        for img, cap in todo:
            rel = cap.relative_to(root).as_posix()
            if rel in already and cap.exists():
                run.resumed.append(rel)
            else:
                left.append((img, cap))
        todo = left
    writer = CaptionWriter(root, operation=f"caption with {captioner.name}")
    writer.check({cap.parent for _, cap in todo})  # fail on a read-only folder before the slow part
    add_trigger = prefix_transform(trigger) if trigger and trigger.strip() else None
    bar = None
    if progress is None and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"captioning ({captioner.name})", unit="img", file=sys.stderr,
                   disable=None)  # disable=None: no bar when stderr is not a terminal; it shows rate and ETA
    done = 0
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images, paths, caps = [], [], []
            for img, cap in chunk:
                if captioner.needs_pixels:
                    try:  # the scan's header-and-tail check passed; a decode can still find a broken middle
                        images.append(load_rgb(img))
                    except ImageError as e:
                        rel = img.relative_to(root).as_posix()
                        run.skipped.append(Problem(rel, e.reason.replace(" ", "_"), f"{rel}: {e.reason}"))
                        continue
                paths.append(img)
                caps.append(cap)
            texts = _caption_chunk(captioner, images, paths) if paths else []
            out = {}
            for img, cap, text in zip(paths, caps, texts):
                rel = img.relative_to(root).as_posix()
                if isinstance(text, Exception):
                    run.not_captioned.append(Problem(rel, "caption_failed", f"{rel}: {captioner.name} could not "
                                                                             f"read it: {first_line(text)}"))
                    continue
                text = " ".join(text.split())
                if not text:
                    run.not_captioned.append(Problem(rel, "empty_caption", f"{rel}: {captioner.name} answered "
                                                                           f"with an empty caption"))
                    continue
                out[cap] = add_trigger(text) if add_trigger else text
            written = writer.write(out)
            run.written.extend(written)
            if state is not None and out:
                state.add(sorted(cap.relative_to(root).as_posix() for cap in out))
            done += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
            if progress is not None:
                progress(done, len(todo))
    finally:
        if bar is not None:
            bar.close()
    if state is not None:
        state.finish()
    run.backup = writer.result.backup
    return run
