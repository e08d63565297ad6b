"""Multi-LoRA generation: a loaded base model, several LoRAs mixed with weights (fused or as adapters), images and grids."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from trainer.common.cpu_alloc import is_cpu, keep_cpu_buffers
from trainer.errors import UserError
# Split out of this module; re-exported here because callers import them from trainer.generate.engine.
from trainer.generate.inspection import _addnet, format_inspection, inspect_lora  # noqa: F401
from trainer.generate.library import (_checkpoint_label, find_lora, list_lora_saves, list_loras,  # noqa: F401
                                      resolve_lora)
from trainer.generate.prompt_syntax import (LoraTag, a1111_alias, parse_attention, parse_lora_arg, parse_prompt,
                                           strip_lora_tags)

MODES = ("fused", "unfused")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ requests


@dataclass
class LoraSpec:
    """One LoRA to apply: a file path (or a LoRA already read by `lora_io.read_lora`) and its multipliers.

    `weight` sets both parts; `te_weight` / `unet_weight` override it for the text encoder(s) / the UNet
    (A1111's `<lora:name:te:unet>`). `dyn` keeps only the first `dyn` ranks. `name` is the alias written in
    the image's parameters (default: the file stem).
    """
    source: Any
    weight: float = 1.0
    te_weight: float | None = None
    unet_weight: float | None = None
    dyn: int | None = None
    name: str | None = None

    @property
    def te(self) -> float:
        return float(self.weight if self.te_weight is None else self.te_weight)

    @property
    def unet(self) -> float:
        return float(self.weight if self.unet_weight is None else self.unet_weight)

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """From a command-line value: `FILE`, `FILE:W`, `FILE:TE:UNET`, `NAME:te=..:unet=..`."""
        return cls.from_tag(parse_lora_arg(text))

    @classmethod
    def from_tag(cls, tag: LoraTag) -> "LoraSpec":
        return cls(tag.name, tag.unet_weight, tag.te_weight, tag.unet_weight, tag.dyn)


@dataclass
class _Loaded:
    """A LoRA file read once and matched to this base model's layers."""
    key: tuple                 # (resolved path, mtime_ns, size): a changed file is read again
    path: Path
    lora: Any                  # lora_io.LoraFile
    targets: dict              # "<component>:<module path>" -> the base nn.Module (Linear / Conv2d)
    addnet_hash: str


@dataclass
class _Active:
    loaded: _Loaded
    name: str
    te: float
    unet: float
    dyn: int | None
    from_prompt: bool = False

    def signature(self) -> tuple:
        return (self.loaded.key, self.te, self.unet, self.dyn)


@dataclass
class GridResult:
    """A comparison grid: the image, its axis labels (rows top to bottom, columns left to right) and parameters."""
    image: Any
    row_title: str
    row_labels: list[str]
    col_title: str
    col_labels: list[str]
    parameters: str
    cell_size: tuple[int, int]


# ------------------------------------------------------------------------------------------------ engine


class Generator:
    """Keeps one base model loaded and applies any number of LoRAs to it.

    fused (default): like A1111, the original weights of the touched layers are backed up once (CPU copy) and
    `W = W0 + sum_i m_i * scale_i * dW_i` is written into them (fp32 math, cast to the layer dtype); every change
    restores the backup first, so the base weights come back bit for bit. Image time equals the base model's.
    unfused: one peft adapter per LoRA (scale alpha/r per module) with per-adapter multipliers, as diffusers'
    `set_adapters`; changing weights is instant, each step costs a little more. Unloading removes the adapters.
    LoRA files are read once and kept in RAM (keyed by path, mtime and size).
    """

    def __init__(self, base_model, *, lora_dir: str | Path | None = None, allow_partial: bool = False,
                 max_cached: int = 16):
        self.base = base_model
        self.family: str = base_model.family
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.allow_partial = allow_partial
        self.max_cached = max(1, int(max_cached))
        self._models: dict[str, Any] = {"unet": base_model.unet}
        if is_cpu(next(base_model.unet.parameters()).device):
            keep_cpu_buffers()  # see cpu_alloc: fused and base images then run at the same speed on CPU
        for i, te in enumerate(base_model.text_encoders or []):
            self._models["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
        self._names = {comp: {id(m): n for n, m in model.named_modules()} for comp, model in self._models.items()}
        self._cache: OrderedDict[str, _Loaded] = OrderedDict()
        self._explicit: list[_Active] = []
        self._mode = "fused"
        self._applied: tuple = ("fused", ())
        self._active: list[_Active] = []
        self._backup: dict[Any, Any] = {}             # module -> CPU copy of its original weight (fused)
        self._adapters: dict[tuple, str] = {}         # (loaded.key, dyn) -> peft adapter name (unfused)
        self._adapter_layers: dict[str, list] = {}    # adapter name -> [(component, module path)]
        self._adapter_counter = 0
        self._wrappers: dict[tuple[str, str], Any] = {}  # (component, module path) -> peft LoRA layer
        self._told_fused: set = set()                 # files already logged as patched in unfused mode
        self._pipe = None
        self._lock = threading.RLock()
        # one engine owns a loaded model's weights: a new Generator takes over from the previous one, which
        # first gives the original weights back (fused) and removes its adapters
        previous = getattr(base_model, "_lorastudio_generator", None)
        previous = previous() if previous is not None else None
        if previous is not None and previous is not self:
            previous.release()
        with contextlib.suppress(AttributeError, TypeError):
            base_model._lorastudio_generator = weakref.ref(self)

    # ---- LoRA files

    def load_lora(self, source) -> _Loaded:
        """Read (or take from the RAM cache) a LoRA file and match it to this model; errors are UserError."""
        from trainer.lora.io import match_modules, read_lora

        if not isinstance(source, (str, Path)):  # an already-read LoraFile
            lora = source
            path = Path(lora.path)
            key = ("<loaded>", str(path), id(lora))
            hit = self._cache.get(str(key))
            if hit is None:
                targets = match_modules(lora, self.base.unet, list(self.base.text_encoders or []),
                                        family=self.family, allow_partial=self.allow_partial)
                hit = _Loaded(key, path, lora, targets, _addnet(lora))
                self._remember(str(key), hit)
            return hit
        path = self._resolve(str(source))
        try:
            st = path.stat()
        except OSError as e:
            raise UserError(f"LoRA file {path}: cannot read it ({e.strerror})", path=str(path)) from None
        key = (str(path), st.st_mtime_ns, st.st_size)
        hit = self._cache.get(str(path))
        if hit is not None and hit.key == key:
            self._cache.move_to_end(str(path))
            return hit
        try:
            lora = read_lora(path, allow_partial=self.allow_partial)
        except UserError:
            raise
        except Exception as e:  # a reader bug must still reach the user as one line naming the file
            raise UserError(f"LoRA file {path}: not a readable LoRA ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})", path=str(path)) from None
        targets = match_modules(lora, self.base.unet, list(self.base.text_encoders or []),
                                family=self.family, allow_partial=self.allow_partial)
        hit = _Loaded(key, path, lora, targets, _addnet(lora))
        self._remember(str(path), hit)
        return hit

    def _remember(self, k: str, loaded: _Loaded) -> None:
        self._cache[k] = loaded
        self._cache.move_to_end(k)
        in_use = {a.loaded.key for a in self._explicit + self._active}
        while len(self._cache) > self.max_cached:
            old = next((c for c, v in self._cache.items() if v.key not in in_use), None)
            if old is None:
                break
            del self._cache[old]

    def _resolve(self, name: str) -> Path:
        return resolve_lora(name, self.lora_dir)

    # ---- choosing LoRAs

    def set_loras(self, specs: Iterable[LoraSpec | str], mode: str = "fused") -> None:
        """Choose the LoRAs (and their weights) for the next images and apply them now.

        Files are read only the first time (or when they changed on disk); a new weight only re-merges.
        """
        if mode not in MODES:
            raise UserError(f"mode: unknown LoRA mode {mode!r}; choose fused or unfused", field="mode")
        with self._lock:
            active = [self._activate(s) for s in specs]
            self._explicit = active
            self._mode = mode
            self._apply(active)

    def clear_loras(self) -> None:
        """Back to the base model: fused weights restored bit for bit, adapters removed."""
        self.set_loras([], mode=self._mode)

    def release(self) -> None:
        """Give the base model back untouched (as `clear_loras`) and forget the RAM cache of LoRA files."""
        with self._lock:
            self.clear_loras()
            self._cache.clear()

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def active_loras(self) -> list[dict]:
        """What is applied now: name, path, hash and weights of each LoRA."""
        return [{"name": a.name, "path": str(a.loaded.path), "hash": a.loaded.addnet_hash[:12], "te_weight": a.te,
                 "unet_weight": a.unet, "dyn": a.dyn} for a in self._active]

    def _activate(self, spec: LoraSpec | str, from_prompt: bool = False) -> _Active:
        if isinstance(spec, str):
            spec = LoraSpec.parse(spec)
        weights = []
        for w, what in ((spec.weight if spec.te_weight is None else spec.te_weight, "te weight"),
                        (spec.weight if spec.unet_weight is None else spec.unet_weight, "unet weight")):
            try:
                w = float(w)
            except (TypeError, ValueError):
                w = math.nan
            if not math.isfinite(w):
                raise UserError(f"LoRA {_stem(spec.source)}: {what} {w!r} is not a number")
            weights.append(w)
        if spec.dyn is not None and (not isinstance(spec.dyn, int) or spec.dyn < 1):
            raise UserError(f"LoRA {_stem(spec.source)}: dyn {spec.dyn!r} must be a whole number >= 1")
        loaded = self.load_lora(spec.source)
        name = spec.name or (spec.source if from_prompt else Path(loaded.path).stem)
        return _Active(loaded, str(name), weights[0], weights[1], spec.dyn, from_prompt)

    def _apply(self, active: list[_Active]) -> None:
        sig = (self._mode, tuple(a.signature() for a in active))
        if sig == self._applied:
            self._active = active
            return
        if self._mode == "fused":
            self._remove_all_adapters()
            self._fuse(active)
        else:
            # LoHa, LoKr, DoRA and Tucker-core files have no peft LoRA adapter: patched into the weights (as in
            # fused mode, so the images are the same) while the plain LoRAs run as adapters
            patched = [a for a in active if not _file_is_plain(a.loaded)]
            for a in patched:
                if a.loaded.key not in self._told_fused:
                    self._told_fused.add(a.loaded.key)
                    log.info("%s: %s modules have no adapter form; applied fused (weights patched) in unfused "
                             "mode", a.loaded.path.name, "/".join(sorted({m.label for m in a.loaded.lora.modules.values()
                                                                          if not m.is_plain})))
            self._fuse(patched)
            self._apply_adapters([a for a in active if _file_is_plain(a.loaded)])
        self._applied = sig
        self._active = active

    # ---- fused

    def _restore_fused(self, keep: set) -> None:
        import torch
        with torch.no_grad():
            for mod, w0 in list(self._backup.items()):
                mod.weight.data.copy_(w0)
                if mod not in keep:
                    del self._backup[mod]

    def _fuse(self, active: list[_Active]) -> None:
        import torch
        per_module: dict[Any, list] = {}
        for a in active:
            for key, mod in a.loaded.targets.items():
                m = a.unet if key.startswith("unet:") else a.te
                if m != 0:
                    per_module.setdefault(mod, []).append((m, a.loaded.lora.modules[key], a.dyn))
        self._restore_fused(keep=set(per_module))
        with torch.no_grad():
            for mod, items in per_module.items():
                w = mod.weight
                if mod not in self._backup:
                    self._backup[mod] = w.detach().to("cpu", copy=True)
                # fp32 layers are merged in place (no full-size temporary); others through an fp32 copy
                in_place = w.dtype == torch.float32 and w.is_contiguous()
                merged = w.data.view(w.shape[0], -1) if in_place else w.detach().to(torch.float32).flatten(1)
                ups, downs = [], []
                for m, lm, dyn in items:
                    if lm.dora_scale is not None:  # DoRA: against the original weight, whatever else is mixed in
                        w0 = self._backup[mod].to(w.device, torch.float32)
                        merged += lm.delta(m, base_weight=w0).flatten(1)
                    elif _plain(lm):
                        down, up = lm.down, lm.up
                        if dyn is not None:
                            down, up = down[:dyn], up[:, :dyn]
                        ups.append(up.flatten(1).to(w.device, torch.float32) * (m * float(lm.scale)))
                        downs.append(down.flatten(1).to(w.device, torch.float32))
                    else:  # Tucker core, LoHa, LoKr: the module computes the full update (dyn is LoRA's only)
                        merged += lm.delta(m).to(w.device, torch.float32).flatten(1)
                if ups:
                    merged.addmm_(torch.cat(ups, 1), torch.cat(downs, 0))
                if not in_place:
                    w.data.copy_(merged.view_as(w).to(w.dtype))

    # ---- unfused (peft adapters)

    def _apply_adapters(self, active: list[_Active]) -> None:
        wanted = {(a.loaded.key, a.dyn) for a in active}
        for k in [k for k in self._adapters if k not in wanted]:
            self._remove_adapter(self._adapters.pop(k))
        for a in active:
            k = (a.loaded.key, a.dyn)
            if k not in self._adapters:
                self._adapters[k] = self._inject(a.loaded, a.dyn)
        # set_adapters equivalent: per layer, the active adapters and their multipliers
        weights: dict[str, dict[str, float]] = {}
        for a in active:
            name = self._adapters[(a.loaded.key, a.dyn)]
            w = weights.setdefault(name, {"unet": 0.0, "te": 0.0})
            w["unet"] += a.unet  # the same file twice adds up, as in fused mode
            w["te"] += a.te
        for (comp, _), layer in self._wrappers.items():
            part = "unet" if comp == "unet" else "te"
            on = []
            for name in layer.lora_A.keys():
                m = weights.get(name, {}).get(part, 0.0)
                if m != 0:
                    layer.set_scale(name, m)
                    on.append(name)
            if on:
                layer.set_adapter(on, inference_mode=True)
                layer._disable_adapters = False  # enable_adapters(True) would make the weights trainable
            else:
                layer.enable_adapters(False)  # exactly the base layer's forward

    def _inject(self, loaded: _Loaded, dyn: int | None) -> str:
        """One peft LoRA adapter per file: r and alpha per module (alpha/r = the file's scale), file weights loaded.

        The peft layers are built directly on the matched layers (what `inject_adapter_in_model` does with an
        exact rank_pattern/alpha_pattern per module, without its whole-model scans, ~5x faster).
        """
        import torch
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import layer as peft_layers
        from peft.utils.integrations import init_empty_weights

        self._adapter_counter += 1
        adapter = f"lora{self._adapter_counter}"
        for key in loaded.targets:
            if not _plain(loaded.lora.modules[key]):
                raise UserError(f"LoRA file {loaded.path}: module {key} is not a plain LoRA (it has a Tucker core); "
                                "use fused mode for it")
        cfg = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, init_lora_weights=False, target_modules=[])
        layers = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key, base in loaded.targets.items():
                lm = loaded.lora.modules[key]
                comp = key.split(":", 1)[0]
                name = self._names[comp][id(base)]
                model = self._models[comp]
                r = lm.rank if dyn is None else min(dyn, lm.rank)
                alpha = float(lm.scale) * r  # peft's scaling alpha/r is then the file's alpha/rank
                current = self._wrappers.get((comp, name))
                with init_empty_weights():  # no random init: the file's weights replace them right away
                    if current is not None:
                        current.update_layer(adapter, r, lora_alpha=alpha, config=cfg)
                    else:
                        cls = peft_layers.Conv2d if isinstance(base, torch.nn.Conv2d) else peft_layers.Linear
                        current = cls(base, adapter, config=cfg, r=r, lora_alpha=alpha)
                if current is not self._wrappers.get((comp, name)):
                    parent_name, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent_name) if parent_name else model, child, current)
                    self._wrappers[(comp, name)] = current
                dt, dev = base.weight.dtype, base.weight.device
                a, b = current.lora_A[adapter], current.lora_B[adapter]
                a.weight = torch.nn.Parameter(lm.down[:r].to(dev, dt).reshape(a.weight.shape), requires_grad=False)
                b.weight = torch.nn.Parameter(lm.up[:, :r].to(dev, dt).reshape(b.weight.shape), requires_grad=False)
                assert isinstance(current, LoraLayer)
                layers.append((comp, name))
        self._adapter_layers[adapter] = layers
        return adapter

    def _remove_adapter(self, adapter: str) -> None:
        for comp, name in self._adapter_layers.pop(adapter, []):
            layer = self._wrappers.get((comp, name))
            if layer is None:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer.delete_adapter(adapter)
            if not layer.lora_A:  # no adapter left: put the original layer back
                model = self._models[comp]
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
                del self._wrappers[(comp, name)]

    def _remove_all_adapters(self) -> None:
        for k in list(self._adapters):
            self._remove_adapter(self._adapters.pop(k))

    # ---- images

    def _pipeline(self, sampler: str):
        from trainer.generate.samplers import make_sampler
        scheduler = make_sampler(sampler, dict(self.base.scheduler_config))
        if self._pipe is None:
            self._pipe = self.base.make_pipeline(scheduler=scheduler)
            if hasattr(self._pipe, "set_progress_bar_config"):
                self._pipe.set_progress_bar_config(disable=True)
        else:
            self._pipe.scheduler = scheduler
        return self._pipe

    def _prompt_encoder(self, clip_skip: int):
        from trainer.common.prompt_encoding import PromptEncoder
        return PromptEncoder(self.family, self.base.tokenizers, clip_skip)

    def resolve_prompt(self, prompt: str) -> tuple[str, list[_Active]]:
        """The prompt the model sees and the LoRAs it asks for (names looked up in the LoRA folder)."""
        text, tags = parse_prompt(prompt)
        return text, [self._activate(LoraSpec.from_tag(t), from_prompt=True) for t in tags]

    def generate(self, prompt: str, negative_prompt: str = "", seed: int = 1, steps: int = 20,
                 guidance_scale: float = 7.0, width: int = 512, height: int = 512, batch_size: int = 1,
                 sampler: str = "euler", *, clip_skip: int | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> list:
        """Images (PIL) for one prompt; image i uses seed + i. `<lora:...>` tags in the prompt are applied on top
        of `set_loras`. Each image carries its A1111 `parameters` text in `image.info["parameters"]`."""
        check_image_size(width, height, steps, int(batch_size))
        return self._generate(prompt, negative_prompt, [seed + i for i in range(int(batch_size))], steps=steps,
                              guidance_scale=guidance_scale, width=width, height=height, sampler=sampler,
                              clip_skip=clip_skip, on_step=on_step)

    def _generate(self, prompt: str, negative_prompt: str, seeds: list[int], *, steps: int, guidance_scale: float,
                  width: int, height: int, sampler: str, clip_skip: int | None = None,
                  on_step: Callable[[int, int], None] | None = None, extra: dict | None = None) -> list:
        import torch
        check_image_size(width, height, steps)
        if not seeds:
            raise UserError("batch: no images asked for (give at least one seed)", field="batch")
        with self._lock:
            text, from_prompt = self.resolve_prompt(prompt)
            active = self._explicit + from_prompt
            self._apply(active)
            pipe = self._pipeline(sampler)
            clip_skip = clip_skip if clip_skip is not None else getattr(self.base, "clip_skip", 1) or 1
            kwargs = {}
            if on_step is not None:
                def _cb(p, i, t, kw):
                    on_step(i + 1, steps)
                    return kw
                kwargs["callback_on_step_end"] = _cb
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
            with torch.inference_mode():
                # A1111's prompt: (word:1.2) weights, BREAK, as many 77-token windows as it needs, clip skip on
                # both prompts (trainer.common.prompt_encoding, the encoding training samples use too)
                embeds = self._prompt_encoder(clip_skip).pipeline_embeddings(
                    parse_attention(text), parse_attention(strip_lora_tags(negative_prompt or "")),
                    list(self.base.text_encoders), zero_empty_negative=bool(
                        getattr(pipe.config, "force_zeros_for_empty_prompt", False)))
                out = pipe(**embeds, num_inference_steps=int(steps), guidance_scale=float(guidance_scale),
                           width=int(width), height=int(height), num_images_per_prompt=len(seeds), generator=gens,
                           output_type="pil", **kwargs)
            images = list(out.images)
            for img, s in zip(images, seeds):
                img.info["parameters"] = self.infotext(prompt, negative_prompt, seed=s, steps=steps,
                                                       sampler=sampler, guidance_scale=guidance_scale,
                                                       width=width, height=height, active=active,
                                                       clip_skip=clip_skip, extra=extra)
            return images

    def infotext(self, prompt: str, negative_prompt: str, *, seed: int, steps: int, sampler: str,
                 guidance_scale: float, width: int, height: int, active: list[_Active] | None = None,
                 clip_skip: int = 1, extra: dict | None = None) -> str:
        """A1111-style parameters: the prompt with a `<lora:...>` tag for every LoRA (so pasting it reproduces the
        image), the negative prompt, then settings, `Lora hashes` (addnet, 12 hex) and weights."""
        from trainer.generate.samplers import png_parameters
        active = self._active if active is None else active
        tags = [_tag(a) for a in active if not a.from_prompt]
        full_prompt = " ".join([prompt] + tags) if tags else prompt
        loras, seen = [], set()
        for a in active:
            alias = a1111_alias(a.name)
            if alias not in seen:
                seen.add(alias)
                loras.append((alias, a.loaded.addnet_hash, a.unet))
        more = {}
        if clip_skip and clip_skip > 1:
            more["Clip skip"] = clip_skip
        if any(a.te != a.unet for a in active):
            more["Lora te weights"] = _quote(", ".join(f"{a1111_alias(a.name)}: {a.te:g}" for a in active))
        if active:
            more["Lora mode"] = self._mode
        more.update(extra or {})
        return png_parameters(full_prompt, negative_prompt, steps=int(steps), sampler=sampler,
                              cfg_scale=float(guidance_scale), seed=int(seed), width=int(width), height=int(height),
                              model=str(getattr(self.base, "name", "") or ""), loras=loras, extra=more)

    # ---- grids

    def grid_weight_seed(self, lora: LoraSpec | str, weights: Sequence[float], seeds: Sequence[int], prompt: str,
                         negative_prompt: str = "", **gen) -> GridResult:
        """Rows: seeds; columns: the LoRA's weight (other `set_loras` LoRAs stay as they are)."""
        spec = LoraSpec.parse(lora) if isinstance(lora, str) else lora
        fixed = list(self._explicit)
        name = spec.name or _stem(spec.source)
        cells = [[None] * len(weights) for _ in seeds]
        try:
            for j, w in enumerate(weights):
                self._explicit = fixed + [self._activate(LoraSpec(spec.source, float(w), name=name))]
                for i, s in enumerate(seeds):
                    cells[i][j] = self._generate(prompt, negative_prompt, [int(s)], **_gen(gen))[0]
        finally:
            self._explicit = fixed
            self._apply(fixed)
        return self._grid(cells, "seed", [str(s) for s in seeds], f"{name} weight", [f"{w:g}" for w in weights],
                          prompt, negative_prompt, seeds[0], gen)

    def grid_checkpoint_weight(self, checkpoints: Sequence[str | Path], weights: Sequence[float], prompt: str,
                               negative_prompt: str = "", seed: int = 1, **gen) -> GridResult:
        """Rows: the saves of a run (oldest first); columns: weight. Pass `list_lora_saves(run_dir)`."""
        fixed = list(self._explicit)
        files = [Path(c) for c in checkpoints]
        if not files:
            raise UserError("checkpoints: no LoRA files to compare")
        cells = [[None] * len(weights) for _ in files]
        try:
            for i, f in enumerate(files):
                for j, w in enumerate(weights):
                    self._explicit = fixed + [self._activate(LoraSpec(str(f), float(w), name=f.stem))]
                    cells[i][j] = self._generate(prompt, negative_prompt, [int(seed)], **_gen(gen))[0]
        finally:
            self._explicit = fixed
            self._apply(fixed)
        return self._grid(cells, "checkpoint", [_checkpoint_label(f) for f in files], "weight",
                          [f"{w:g}" for w in weights], prompt, negative_prompt, seed, gen)

    def grid_prompt_lora(self, prompts: Sequence[str], loras: Sequence[LoraSpec | str], negative_prompt: str = "",
                         seed: int = 1, include_base: bool = True, **gen) -> GridResult:
        """Rows: prompts; columns: no LoRA (if `include_base`), then each LoRA alone at its weight."""
        specs = [LoraSpec.parse(s) if isinstance(s, str) else s for s in loras]
        fixed = list(self._explicit)
        cols: list[tuple[str, list]] = [("base", [])] if include_base else []
        for s in specs:
            a = self._activate(s)
            label = a.name if (a.te == a.unet == 1.0) else (f"{a.name} {a.unet:g}" if a.te == a.unet
                                                              else f"{a.name} te {a.te:g} unet {a.unet:g}")
            cols.append((label, [a]))
        cells = [[None] * len(cols) for _ in prompts]
        try:
            for j, (_, extra_loras) in enumerate(cols):
                self._explicit = fixed + extra_loras
                for i, p in enumerate(prompts):
                    cells[i][j] = self._generate(p, negative_prompt, [int(seed)], **_gen(gen))[0]
        finally:
            self._explicit = fixed
            self._apply(fixed)
        return self._grid(cells, "prompt", list(prompts), "LoRA", [c[0] for c in cols], prompts[0] if prompts else "",
                          negative_prompt, seed, gen)

    def _grid(self, cells, row_title, row_labels, col_title, col_labels, prompt, negative, seed, gen) -> GridResult:
        image = make_grid(cells, row_labels, col_labels, row_title=row_title, col_title=col_title)
        g = _gen(gen)
        params = self.infotext(prompt, negative, seed=int(seed), steps=g["steps"], sampler=g["sampler"],
                               guidance_scale=g["guidance_scale"], width=g["width"], height=g["height"],
                               active=self._explicit,
                               extra={"Grid": _quote(f"rows {row_title} [{'; '.join(row_labels)}], "
                                                     f"columns {col_title} [{'; '.join(col_labels)}]")})
        image.info["parameters"] = params
        w, h = cells[0][0].size
        return GridResult(image, row_title, list(row_labels), col_title, list(col_labels), params, (w, h))


# ------------------------------------------------------------------------------------------------ helpers


def _gen_defaults() -> dict:
    from trainer.generate.settings import GENERATE_FIELDS
    out = {k: GENERATE_FIELDS[k].default for k in ("steps", "guidance_scale", "width", "height", "sampler")}
    return {**out, "clip_skip": None}  # None: the base model's own clip skip


_GEN_DEFAULTS = _gen_defaults()


def _gen(gen: dict) -> dict:
    unknown = set(gen) - set(_GEN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown generation settings: {sorted(unknown)}")
    return {**_GEN_DEFAULTS, **gen}


def check_image_size(width: int, height: int, steps: int, batch: int | None = None) -> None:
    """Width, height, steps (and, for one request, the batch) against the generation settings' ranges
    (``trainer.generate.settings``: the limits the CLI flags and the GUI controls have too).

    ``batch=None`` skips the per-request image limit: internal callers (grids, the toy-world harness) make
    many one-seed calls or evaluation batches that are not a user's request."""
    from trainer.generate.settings import check
    for name, v in (("width", width), ("height", height), ("steps", steps)):
        check(name, int(v))
    if batch is not None:
        check("batch", int(batch))


def _quote(text: str) -> str:
    """An infotext value with commas, quoted the way A1111 writes (and parses) them (json.dumps)."""
    import json
    return json.dumps(text, ensure_ascii=False)


def _plain(lm) -> bool:
    """A LoRA module that is exactly up @ down (no Tucker core, no DoRA magnitude, not LoHa/LoKr)."""
    return getattr(lm, "kind", "lora") == "lora" and getattr(lm, "mid", None) is None \
        and getattr(lm, "dora_scale", None) is None


def _file_is_plain(loaded) -> bool:
    """Every module of the file can be a peft LoRA adapter."""
    return all(_plain(loaded.lora.modules[k]) for k in loaded.targets)


def _stem(source) -> str:
    if isinstance(source, (str, Path)):
        return Path(str(source)).stem
    return Path(source.path).stem


def _tag(a: _Active) -> str:
    return LoraTag(a1111_alias(a.name), a.te, a.unet, a.dyn).to_tag()


def make_grid(cells: list[list[Any]], row_labels: Sequence[str], col_labels: Sequence[str], *,
              row_title: str = "", col_title: str = "") -> Any:
    """One image: the column title once across the top, the column labels under it (one per cell), the row title
    in the top-left corner and the row labels on the left, cells (all the same size) in between. Every line is
    wrapped, and a word wider than its cell is broken, so no label runs into its neighbour however long a LoRA
    name is (a 64 px cell and "demo-lora-step00000013" must stay readable)."""
    from PIL import Image, ImageDraw, ImageFont

    if not cells or not cells[0]:
        raise UserError("grid: nothing to draw (no rows or no columns)")
    cw, ch = cells[0][0].size
    size = max(10, min(28, cw // 12))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(t: str) -> tuple[int, int]:
        box = probe.textbbox((0, 0), t, font=font)
        return box[2] - box[0], box[3] - box[1]

    line_h = text_size("Ag")[1] + 4
    pad = max(4, size // 2)
    left_w = max(cw, 2 * size * 4)  # room for wrapped row labels
    cols_w = cw * len(col_labels)
    title_lines = _wrap(col_title, cols_w - 2 * pad, text_size) if col_title else []
    corner_lines = _wrap(row_title, left_w - 2 * pad, text_size) if row_title else []
    row_lines = [_wrap(t, left_w - 2 * pad, text_size) for t in row_labels]
    col_lines = [_wrap(t, cw - 2 * pad, text_size) for t in col_labels]
    label_h = max(len(ls) for ls in col_lines) * line_h
    top_h = max(len(title_lines) * line_h + label_h, len(corner_lines) * line_h) + 2 * pad
    width, height = left_w + cols_w, top_h + ch * len(row_labels)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title_lines):
        draw.text((left_w + (cols_w - text_size(line)[0]) // 2, pad + k * line_h), line, fill="black", font=font)
    for k, line in enumerate(corner_lines):
        draw.text((pad, pad + k * line_h), line, fill="black", font=font)
    y_labels = pad + len(title_lines) * line_h
    for j, lines in enumerate(col_lines):
        x0 = left_w + j * cw
        for k, line in enumerate(lines):
            draw.text((x0 + (cw - text_size(line)[0]) // 2, y_labels + k * line_h), line, fill="black", font=font)
    for i, lines in enumerate(row_lines):
        y0 = top_h + i * ch + max(pad, (ch - len(lines) * line_h) // 2)
        for k, line in enumerate(lines):
            draw.text((pad, y0 + k * line_h), line, fill="black", font=font)
        for j in range(len(col_labels)):
            img = cells[i][j]
            if img.size != (cw, ch):
                img = img.resize((cw, ch))
            grid.paste(img.convert("RGB"), (left_w + j * cw, top_h + i * ch))
    return grid


def _wrap(text: str, max_w: int, text_size) -> list[str]:
    """Lines of ``text`` no wider than ``max_w``: broken at spaces, and inside a word that alone is too wide
    (after '-' or '_' where it can, else anywhere); at most 6 lines, the last cut with '...'."""
    def pieces(word: str) -> list[str]:
        out, cur = [], ""
        for ch in word:
            if cur and text_size(cur + ch)[0] > max_w:
                cut = max(cur.rfind("-"), cur.rfind("_"))
                if 0 < cut < len(cur) - 1:  # prefer a break after the last '-' / '_'
                    out.append(cur[:cut + 1])
                    cur = cur[cut + 1:]
                if cur and text_size(cur + ch)[0] > max_w:
                    out.append(cur)
                    cur = ""
            cur += ch
        return out + [cur]

    lines, cur = [], ""
    for word in str(text).split():
        parts = pieces(word) if text_size(word)[0] > max_w else [word]
        for part in parts[:-1]:
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(part)
        word = parts[-1]
        cand = f"{cur} {word}".strip()
        if cur and text_size(cand)[0] > max_w:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    lines.append(cur)
    return lines[:6] if len(lines) <= 6 else lines[:5] + [lines[5][:20] + "..."]


def save_image(image, path: str | Path) -> Path:
    """Write a PNG with its `parameters` text chunk (from `image.info`), atomically (temp name, then rename)."""
    from trainer.generate.samplers import save_png
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {path}: the output must be a .png file", path=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, path, image.info.get("parameters", ""))
    return path
