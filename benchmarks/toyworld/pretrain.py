"""Pretrain the toy-world base: a tiny SD1.5-shaped pipeline that draws coloured shapes, trained on a CPU.

    python -m benchmarks.toyworld.pretrain --out trainer/assets/toyworld --seed 0

Stages (all seeded):

1. **Tokenizer**: a CLIPTokenizer with a small vocabulary of our own: CLIP's 512 byte-level symbols, one
   BPE token per caption word (merges learned from ``toyworld.vocabulary()``), start and end tokens. Any
   word still tokenizes (into letters), so unseen trigger words work.
2. **VAE** (AutoencoderKL, 64x64 -> 4x16x16): trained on drawn pictures, 60% of them with a random dark
   overlay (bars at any angle and period, dot lattices, checkers, grids, outlines:
   ``toyworld.random_dark_overlay``), so it can carry dark, fine patterns that style LoRAs will need. MSE
   plus a tiny KL. The latent scaling factor is set to 1 / std of the latents.
3. **Decoder** (encoder frozen, so the latent space stays): fine-tuned on a wider mix, half of it on pale
   backgrounds of any hue (``toyworld.pale_background``) and 60% with the dark overlays, so the VAE also
   carries a tint of the whole picture (the ``paper`` style is one hue among them). ``--decoder-only FOLDER``
   runs this stage alone on an existing toy base.
4. **Text encoder + UNet**, trained jointly on plain pictures (no overlays: the diffusion model never sees
   a style) with captions drawn each step from varied templates, a random made-up word inserted at a
   random place in 25% of captions (so an unseen trigger word anywhere does not change what is drawn) and
   10% empty captions (for classifier-free guidance). SD's scaled_linear DDPM schedule, epsilon target,
   min-SNR-5 loss weighting (Hang et al. 2023), AdamW with warm-up and cosine decay, gradient clipping.
5. **Save**: a StableDiffusionPipeline with a DDIM scheduler, fp16 safetensors, diffusers folder layout.

``--minutes`` is a safety deadline: the VAE stage may use ``--vae-share`` of it, the decoder stage
``--decoder-share``, the UNet stage the rest.
A stage that would run past its deadline anneals its learning rate on wall time instead of steps and stops
at the deadline (it says so, and records the steps done in ``toyworld_pretrain.json``); such a run is not
bit-reproducible. Without a binding deadline the step counts make the run, and the same seed, step counts
and thread count give the same weights. On a machine shared with other jobs, use ``--threads 1`` or set
``OMP_WAIT_POLICY=PASSIVE``: two spinning OpenMP threads that keep losing their core run up to 5x slower.
Figures and provenance of the committed weights: ``docs/toyworld.md``.

Also here, for tests and benchmarks: ``load_toyworld``, ``generate`` (batched, per-picture seeds) and
``roundtrip`` (VAE encode/decode).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from datasets_tools import toyworld as tw
from benchmarks.threads import add_threads_option, use_threads

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "trainer" / "assets" / "toyworld"
MAX_TOKENS = 77
DECODER_STEPS = 600   # decoder-only stage: steps at the VAE batch
DECODER_PALE = 0.5    # share of its pictures on a pale background of a random hue

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                        steps_offset=1, prediction_type="epsilon")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- tokenizer

def build_tokenizer_files(out_dir: Path, words: list[str]) -> None:
    """vocab.json / merges.txt: byte-level base symbols, BPE merges until every word is one token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base]
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        pair = max(sorted(counts), key=lambda p: counts[p])  # sorted: ties broken the same every run
        merges.append(pair)
        vocab.append(pair[0] + pair[1])
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(out)
        seqs = new
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                        encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=MAX_TOKENS)


# ---------------------------------------------------------------- models

def build_models(vocab_size: int, bos: int, eos: int, unet_channels=(32, 64, 64)):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=16, sample_size=tw.SIZE, scaling_factor=1.0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                                      projection_dim=64, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    unet = UNet2DConditionModel(
        sample_size=tw.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(1, 2, 4), cross_attention_dim=64, norm_num_groups=16)  # heads per level
    return vae, te, unet


def count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _lr(step: int, total: int, peak: float, warmup: int, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 0 over ``progress`` (default: step / total)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup) if progress is None else progress
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _to_tensor(imgs: np.ndarray):
    import torch
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------- stages

def train_vae(vae, images: np.ndarray, steps: int, batch: int, seed: int, deadline: float,
              lr: float = 1e-3, decoder_only: bool = False) -> int:
    """Train the VAE (MSE plus a tiny KL). ``decoder_only``: train the decoder (and post-quant conv) only, MSE
    only, with the encoder frozen, so the latent space the UNet learns in stays as it is. Returns the steps done
    (fewer if the deadline came first)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    stage = "decoder" if decoder_only else "vae"
    if decoder_only:
        for p in vae.parameters():
            p.requires_grad_(False)
        params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    budget = max(30.0, deadline - t0)
    done = steps
    for step in range(steps):
        progress = max(step / steps, (time.time() - t0) / budget)  # as in train_unet
        if progress >= 1.0:
            log(f"{stage} time budget reached: {stage} stage ends at step {step} of {steps} (time-bound)")
            done = step
            break
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, 50, max(0.0, progress - 50 / steps) / (1 - 50 / steps))
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = _to_tensor(images[idx.numpy()])
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse if decoder_only else mse + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            log(f"{stage} step {step + 1}/{steps} mse {mse.item():.5f} psnr {psnr:.1f} dB "
                f"({(step + 1) / (time.time() - t0):.2f} steps/s)")
    for p in vae.parameters():
        p.requires_grad_(True)
    vae.eval()
    return done


def encode_all(vae, images: np.ndarray, batch: int = 256):
    """Posterior means and stds of every picture (sampled afresh at each UNet step, as SD trainers do)."""
    import torch
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            post = vae.encode(_to_tensor(images[i:i + batch])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, te, tokenizer, means, stds, colours, shapes, steps: int, batch: int, seed: int,
               deadline: float, lr: float = 1e-3, caption_dropout: float = 0.1, junk_prob: float = 0.25,
               min_snr_gamma: float = 5.0):
    import torch
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    unet.train()
    te.train()
    t0 = time.time()
    budget = max(60.0, deadline - t0)
    ema = None
    done = steps
    for step in range(steps):
        # The schedule follows steps unless the deadline comes first: then it anneals on wall time, so a
        # cut-short run still ends at a low learning rate (and is no longer bit-reproducible).
        progress = max(step / steps, (time.time() - t0) / budget)
        if progress >= 1.0:
            log(f"deadline reached: UNet stage ends at step {step} of {steps} (time-bound, not reproducible)")
            done = step
            break
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, 200, max(0.0, progress - 200 / steps) / (1 - 200 / steps))
        idx = torch.randint(0, len(means), (batch,), generator=g)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g))
        caps = [("" if rng.random() < caption_dropout else
                 tw.caption((colours[i], shapes[i]), rng, junk_prob=junk_prob)) for i in idx.tolist()]
        ids = tokenizer(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        noisy = sched.add_noise(z, noise, t)
        cond = te(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        w = torch.clamp(snr[t], max=min_snr_gamma) / snr[t]
        loss = (per * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"unet step {step + 1}/{steps} loss {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(step + 1) / el:.2f} steps/s, eta {(steps - step - 1) * el / (step + 1) / 60:.1f} min")
    unet.eval()
    te.eval()
    return done


def save_pipeline(out: Path, vae, te, unet, tok_dir: Path) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=make_tokenizer(tok_dir), unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # also the slow-tokenizer files, for loaders that want them
        (tmp / "tokenizer" / name).write_bytes((tok_dir / name).read_bytes())
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)


# ---------------------------------------------------------------- use

def load_toyworld(folder: str | Path = DEFAULT_OUT):
    """The toy base as a float32 StableDiffusionPipeline on the CPU (progress bars off)."""
    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)  # stored as fp16
    pipe.to(torch.float32)  # diffusers versions before `dtype=` ignore it
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float = 5.0,
             batch: int = 100) -> list[np.ndarray]:
    """uint8 HxWx3 pictures for prompts, in batches; picture i's noise depends only on (seed, i)."""
    import torch
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        output_type="np", height=tw.SIZE, width=tw.SIZE).images
        out += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in imgs]
    return out


def roundtrip(vae, images: list) -> list[np.ndarray]:
    """Pictures after a VAE encode (posterior mean) and decode."""
    import torch
    x = _to_tensor(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    with torch.no_grad():
        rec = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mean).sample.float()
    return list(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (diffusers layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=45.0, help="safety deadline for the whole run")
    add_threads_option(ap)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-share", type=float, default=0.35,
                    help="deadline for the VAE stage, as a share of --minutes")
    ap.add_argument("--decoder-steps", type=int, default=DECODER_STEPS,
                    help="decoder-only fine-tune on the wider mix (pale backgrounds of any hue); 0 skips it")
    ap.add_argument("--decoder-share", type=float, default=0.25,
                    help="deadline for the decoder stage, as a share of --minutes")
    ap.add_argument("--n-decoder-images", type=int, default=6000)
    ap.add_argument("--decoder-only", metavar="FOLDER", default=None,
                    help="load the toy base in FOLDER, run only the decoder stage on it and write the result to --out "
                         "(how the committed weights got their decoder: docs/toyworld.md)")
    ap.add_argument("--unet-steps", type=int, default=5000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-channels", default="32,64,64")
    ap.add_argument("--n-vae-images", type=int, default=8000)
    ap.add_argument("--n-images", type=int, default=16000)
    args = ap.parse_args(argv)

    import torch
    use_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    deadline = start + args.minutes * 60
    out = Path(args.out)
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    log(f"toyworld pretraining: seed {args.seed}, {args.threads} threads, out {out}")
    if args.decoder_only:
        return _decoder_only(args, Path(args.decoder_only), out, work, start, deadline)

    build_tokenizer_files(work / "tok", tw.vocabulary())
    tok = make_tokenizer(work / "tok")
    vocab = tok.get_vocab()
    vae, te, unet = build_models(len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"],
                                 tuple(int(c) for c in args.unet_channels.split(",")))
    log(f"parameters: vae {count(vae):,}  text encoder {count(te):,}  unet {count(unet):,}  "
        f"(vocabulary {len(vocab)})")

    t = time.time()
    vae_imgs, _, _ = tw.make_arrays(args.n_vae_images, args.seed + 1, vae_overlay=0.6)
    imgs, colours, shapes = tw.make_arrays(args.n_images, args.seed + 2)
    log(f"drew {len(vae_imgs) + len(imgs)} pictures in {time.time() - t:.0f} s")

    t = time.time()
    vae_done = train_vae(vae, np.concatenate([vae_imgs, imgs[:4000]]), args.vae_steps, args.vae_batch,
                         args.seed + 3, start + args.vae_share * args.minutes * 60)
    log(f"vae stage {time.time() - t:.0f} s ({vae_done} steps)")
    decoder_done = _decoder_stage(args, vae)

    t = time.time()
    means, stds = encode_all(vae, imgs)
    z = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(args.seed + 4))
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    means, stds = means * scale, stds * scale
    log(f"encoded {len(imgs)} pictures in {time.time() - t:.0f} s; latent std {1 / scale:.3f}, "
        f"scaling factor {scale:.4f}")

    t = time.time()
    done = train_unet(unet, te, tok, means, stds, colours, shapes, args.unet_steps, args.unet_batch,
                      args.seed + 5, deadline - 90)  # leave time to save
    log(f"unet stage {time.time() - t:.0f} s ({done} steps)")

    save_pipeline(out, vae, te, unet, work / "tok")
    info = {"seed": args.seed, "threads": args.threads, "vae_steps_planned": args.vae_steps, "vae_steps_done": vae_done,
            "decoder_steps_planned": args.decoder_steps, "decoder_steps_done": decoder_done,
            "unet_steps_planned": args.unet_steps, "unet_steps_done": done, "unet_batch": args.unet_batch,
            "vae_batch": args.vae_batch, "scaling_factor": scale,
            "parameters": {"vae": count(vae), "text_encoder": count(te), "unet": count(unet)},
            "minutes": round((time.time() - start) / 60, 1), "torch": torch.__version__}
    (out / "toyworld_pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    log(f"saved {out} in {(time.time() - start) / 60:.1f} min total")
    return 0


def _decoder_stage(args, vae, deadline: float | None = None) -> int:
    if args.decoder_steps <= 0:
        return 0
    t = time.time()
    imgs, _, _ = tw.make_arrays(args.n_decoder_images, args.seed + 6, vae_overlay=0.6, pale=DECODER_PALE)
    done = train_vae(vae, imgs, args.decoder_steps, args.vae_batch, args.seed + 7,
                     deadline or t + args.decoder_share * args.minutes * 60, lr=5e-4, decoder_only=True)
    log(f"decoder stage {time.time() - t:.0f} s ({done} steps)")
    return done


def _decoder_only(args, src: Path, out: Path, work: Path, start: float, deadline: float) -> int:
    """Run the decoder stage on an existing toy base (its encoder, text encoder, UNet and tokenizer kept)."""
    import shutil

    import torch
    pipe = load_toyworld(src)
    info_file = src / "toyworld_pretrain.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    # configs unchanged by this stage, kept byte for byte (without the loader's _name_or_path); read now, as --out
    # may be FOLDER itself
    configs = {c: (src / c).read_bytes() for c in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                                                   "model_index.json") if (src / c).is_file()}
    done = _decoder_stage(args, pipe.vae, deadline - 30)  # alone: the whole --minutes
    tok_dir = work / "tok"
    shutil.copytree(src / "tokenizer", tok_dir, dirs_exist_ok=True)
    save_pipeline(out, pipe.vae, pipe.text_encoder, pipe.unet, tok_dir)
    for cfg, data in configs.items():
        (out / cfg).write_bytes(data)
    info.update({"decoder_stage": {"from": str(src), "seed": args.seed, "steps_planned": args.decoder_steps,
                                   "steps_done": done, "pale_share": DECODER_PALE, "images": args.n_decoder_images,
                                   "minutes": round((time.time() - start) / 60, 1), "torch": torch.__version__}})
    (out / "toyworld_pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    log(f"saved {out} in {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
