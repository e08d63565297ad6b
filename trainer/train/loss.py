"""The parts of a diffusion training loss, each a small pure function (docs/config.md lists the keys).

Where each option comes from:

* timestep sampling: uniform over [min_timestep, max_timestep); ``logit_normal`` as SD3 trains
  (Esser et al., arXiv:2403.03206, section 3.1); ``shift`` as the resolution shift of the same paper
  (t' = s*t / (1 + (s-1)*t) on t in [0, 1]).
* multi-resolution ("pyramid") noise as kohya's ``pyramid_noise_like`` (multires_noise_iterations/discount).
* input perturbation: Ning et al., arXiv:2301.11706 (noise added to the input only, not to the target).
* pseudo-Huber and smooth-L1 losses with a scheduled c: Kang et al., arXiv:2403.16728, as kohya's
  ``conditional_loss`` and ``get_huber_threshold`` define them.
* min-SNR-gamma weighting: Hang et al., arXiv:2303.09556; debiased estimation: Yu et al., arXiv:2310.15773.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_timesteps(n: int, tr, num_train_timesteps: int, device) -> torch.Tensor:
    """n training timesteps in [tr.min_timestep, tr.max_timestep) drawn as tr.timestep_sampling says."""
    lo, hi = int(tr.min_timestep), min(int(tr.max_timestep), num_train_timesteps)
    if tr.timestep_sampling == "uniform":
        return torch.randint(lo, hi, (n,), device=device).long()
    if tr.timestep_sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(n, device=device))
    elif tr.timestep_sampling == "shift":
        s = float(tr.timestep_shift)
        u = torch.rand(n, device=device)
        u = s * u / (1 + (s - 1) * u)
    else:
        raise ValueError(f"unknown timestep sampling {tr.timestep_sampling!r}")
    return (lo + (u * (hi - lo)).long()).clamp(lo, hi - 1)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Add lower-resolution noise levels (each upsampled, weighted discount**level), renormalised to unit std."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for level in range(1, iterations + 1):
        r = float(torch.rand(()) * 2 + 2)  # a random scale in [2, 4) per level
        hn, wn = max(1, int(h / r ** level)), max(1, int(w / r ** level))
        low = torch.randn(b, c, hn, wn, device=noise.device, dtype=noise.dtype)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount ** level
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def make_noise(latents: torch.Tensor, tr) -> torch.Tensor:
    """The noise the UNet learns to predict: Gaussian, then offset noise and pyramid noise if configured."""
    noise = torch.randn_like(latents)
    if tr.noise_offset:
        # Offset noise (crosslabs.org/blog/diffusion-with-offset-noise): lets the model shift mean brightness.
        noise = noise + tr.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                      device=latents.device, dtype=latents.dtype)
    if tr.multires_noise_iterations:
        noise = pyramid_noise(noise, tr.multires_noise_iterations, tr.multires_noise_discount)
    return noise


def noisy_input(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, tr) -> torch.Tensor:
    """The UNet's input at timestep t; with input perturbation the input's noise differs from the target's."""
    if tr.ip_noise_gamma:
        return scheduler.add_noise(latents, noise + tr.ip_noise_gamma * torch.randn_like(latents), t)
    return scheduler.add_noise(latents, noise, t)


def huber_c(t: torch.Tensor, tr, scheduler) -> torch.Tensor:
    """Per-sample Huber c for timesteps t: constant; exponential (c at t = T, 1 at t = 0); or snr
    ((1 - c) / (1 + sigma_t)**2 + c, so c -> 1 at low noise and -> c at high noise)."""
    c = float(tr.huber_c)
    if tr.huber_schedule == "constant":
        return torch.full(t.shape, c, device=t.device)
    n = scheduler.config.num_train_timesteps
    if tr.huber_schedule == "exponential":
        return torch.exp(-(-math.log(c) / n) * t.float())
    if tr.huber_schedule == "snr":
        ac = scheduler.alphas_cumprod.to(t.device)[t].float()
        sigma = ((1 - ac) / ac) ** 0.5
        return (1 - c) / (1 + sigma) ** 2 + c
    raise ValueError(f"unknown huber schedule {tr.huber_schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, tr, c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per latent element (B, C, H, W), as tr.loss_type says; c is per sample (huber, smooth_l1)."""
    pred, target = pred.float(), target.float()
    if tr.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if tr.loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = c.view(-1, 1, 1, 1)
    root = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    if tr.loss_type == "huber":
        return 2 * c * root
    if tr.loss_type == "smooth_l1":
        return 2 * root
    raise ValueError(f"unknown loss type {tr.loss_type!r}")


def per_example(loss: torch.Tensor, weight: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """Mean loss per example; with a mask weight (B, 1, H, W) the masked mean, or normalised by its area."""
    if weight is None:
        return loss.mean(dim=(1, 2, 3))
    if normalize:
        area = (weight.sum(dim=(1, 2, 3)) * loss.shape[1]).clamp_min(1e-8)
        return (loss * weight).sum(dim=(1, 2, 3)) / area
    return (loss * weight).mean(dim=(1, 2, 3))


def mask_weight(mask: torch.Tensor, unmasked_weight: float) -> torch.Tensor:
    """Loss weight from a 0..1 mask: 1 where it is white, unmasked_weight where it is black."""
    return unmasked_weight + (1.0 - unmasked_weight) * mask


def timestep_weights(scheduler, t: torch.Tensor, tr, v_pred: bool) -> torch.Tensor | None:
    """Per-sample weights for the timesteps (min-SNR-gamma, debiased estimation), or None for none."""
    if not (tr.min_snr_gamma > 0 or tr.debiased_estimation):
        return None
    from diffusers.training_utils import compute_snr
    snr = compute_snr(scheduler, t)
    w = torch.ones_like(snr)
    if tr.min_snr_gamma > 0:
        clipped = torch.clamp(snr, max=tr.min_snr_gamma)
        w = w * (clipped / (snr + 1) if v_pred else clipped / snr)
    if tr.debiased_estimation:
        s = torch.clamp(snr, max=1000.0)
        w = w * (1 / (s + 1) if v_pred else 1 / torch.sqrt(s))
    return w
