"""Each loss and timestep option of trainer.train.loss changes the loss as its definition says."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer import config as C
from trainer.train import loss as L


def tr(**kw):
    t = C.Config().train
    for k, v in kw.items():
        setattr(t, k, v)
    return t


SCHED = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    pred, target = torch.zeros(1, 1, 1, 4), torch.tensor([1e-3, 2e-3, 50.0, -80.0]).view(1, 1, 1, 4)
    c = torch.tensor([0.1])
    huber = L.elementwise_loss(pred, target, tr(loss_type="huber"), c).flatten()
    l2 = L.elementwise_loss(pred, target, tr(loss_type="l2")).flatten()
    assert torch.allclose(huber[:2], l2[:2], rtol=1e-3)                   # |d| << c: d^2
    assert torch.allclose(huber[2:], 2 * 0.1 * target.abs().flatten()[2:], rtol=1e-2)  # |d| >> c: 2c|d|
    smooth = L.elementwise_loss(pred, target, tr(loss_type="smooth_l1"), c).flatten()
    assert torch.allclose(smooth[:2], l2[:2] / 0.1, rtol=1e-3)            # d^2 / c
    assert torch.allclose(smooth[2:], 2 * target.abs().flatten()[2:], rtol=1e-2)      # 2|d|
    l1 = L.elementwise_loss(pred, target, tr(loss_type="l1")).flatten()
    assert torch.equal(l1, target.abs().flatten())


def test_huber_c_schedules():
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(L.huber_c(t, tr(huber_schedule="constant", huber_c=0.2), SCHED), torch.full((3,), 0.2))
    exp = L.huber_c(t, tr(huber_schedule="exponential", huber_c=0.1), SCHED)
    assert exp[0] == pytest.approx(1.0) and exp[2] == pytest.approx(0.1, rel=0.01) and exp[0] > exp[1] > exp[2]
    snr = L.huber_c(t, tr(huber_schedule="snr", huber_c=0.1), SCHED)
    ac = SCHED.alphas_cumprod[t]
    expected = (1 - 0.1) / (1 + ((1 - ac) / ac) ** 0.5) ** 2 + 0.1
    assert torch.allclose(snr, expected.float()) and snr[0] > 0.8 and snr[2] < 0.15


def test_timestep_sampling_bounds_and_shapes():
    torch.manual_seed(0)
    n = 20000
    uni = L.sample_timesteps(n, tr(min_timestep=100, max_timestep=300), 1000, "cpu")
    assert uni.min() >= 100 and uni.max() <= 299 and abs(uni.float().mean().item() - 199.5) < 3
    ln = L.sample_timesteps(n, tr(timestep_sampling="logit_normal"), 1000, "cpu").float()
    un = L.sample_timesteps(n, tr(), 1000, "cpu").float()
    assert abs(ln.mean().item() - 500) < 10 and ln.std() < 0.8 * un.std()  # centred, concentrated
    sh = L.sample_timesteps(n, tr(timestep_sampling="shift", timestep_shift=3.0), 1000, "cpu").float()
    # t' = 3t / (1 + 2t): the median of uniform t (0.5) maps to 0.75
    assert abs(sh.median().item() / 1000 - 0.75) < 0.02
    assert 0 <= sh.min() and sh.max() <= 999


def test_uniform_sampling_is_todays_randint():
    torch.manual_seed(5)
    a = L.sample_timesteps(8, tr(), 1000, "cpu")
    torch.manual_seed(5)
    assert torch.equal(a, torch.randint(0, 1000, (8,)).long())


def test_pyramid_noise_has_unit_std_and_more_low_frequency_energy():
    torch.manual_seed(0)
    white = torch.randn(4, 4, 64, 64)
    pyr = L.pyramid_noise(white, iterations=6, discount=0.4)
    assert pyr.std().item() == pytest.approx(1.0, abs=1e-4)
    low = lambda x: torch.nn.functional.avg_pool2d(x, 16).var().item()  # noqa: E731
    assert low(pyr) > 3 * low(white)


def test_input_perturbation_noises_the_input_only():
    torch.manual_seed(0)
    lat, noise, t = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8), torch.full((64,), 999)
    plain = SCHED.add_noise(lat, noise, t)
    perturbed = L.noisy_input(SCHED, lat, noise, t, tr(ip_noise_gamma=0.1))
    # the extra input noise is gamma * eps scaled like the noise itself (sqrt(1 - alpha_bar_t))
    scale = math.sqrt(1 - SCHED.alphas_cumprod[999].item())
    assert (perturbed - plain).std().item() == pytest.approx(0.1 * scale, rel=0.05)
    assert torch.equal(L.noisy_input(SCHED, lat, noise, t, tr()), plain)


def test_debiased_estimation_and_min_snr_weights():
    from diffusers.training_utils import compute_snr
    t = torch.tensor([10, 500, 990])
    snr = compute_snr(SCHED, t)
    assert L.timestep_weights(SCHED, t, tr(), False) is None
    deb = L.timestep_weights(SCHED, t, tr(debiased_estimation=True), False)
    assert torch.allclose(deb, 1 / torch.sqrt(torch.clamp(snr, max=1000)))
    assert torch.allclose(L.timestep_weights(SCHED, t, tr(debiased_estimation=True), True),
                          1 / (torch.clamp(snr, max=1000) + 1))
    ms = L.timestep_weights(SCHED, t, tr(min_snr_gamma=5.0), False)
    assert torch.allclose(ms, torch.clamp(snr, max=5.0) / snr)


def test_mask_weight_ignores_black_and_normalises_by_area():
    loss = torch.ones(2, 4, 8, 8)
    loss[:, :, :, 4:] = 100.0                       # a large error on the right half
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0                         # ... which the mask leaves out
    w = L.mask_weight(mask, 0.0)
    per = L.per_example(loss, w, normalize=False)
    assert torch.allclose(per, torch.full((2,), 0.5))   # mean over all cells: half of them count, at 1
    assert torch.allclose(L.per_example(loss, w, normalize=True), torch.ones(2))  # per masked area: 1
    half = L.mask_weight(mask, 0.5)
    assert torch.allclose(half[0, 0, 0], torch.tensor([1, 1, 1, 1, .5, .5, .5, .5]))
    assert torch.equal(L.per_example(loss, None, False), loss.mean(dim=(1, 2, 3)))


def test_every_option_is_in_the_schema_with_its_choices():
    keys = {f.key: f for f in C.iter_fields()}
    assert keys["train.loss_type"].choices == C.schema.LOSS_TYPES
    for k in ("train.huber_c", "train.multires_noise_iterations", "train.ip_noise_gamma", "train.debiased_estimation",
              "train.min_timestep", "train.max_timestep", "train.timestep_sampling", "train.timestep_shift"):
        assert k in keys and keys[k].help
    from trainer.errors import UserError
    with pytest.raises(UserError, match="train.min_timestep"):
        cfg = C.load_config(None, ["model.base=x", "data.dir=y", "train.min_timestep=500", "train.max_timestep=400"])
        C.validate_for_training(cfg)


def test_a_run_with_every_loss_option_trains(tiny_sd1_dir, image_folder, tmp_path):
    from tests.fixtures.runs import tiny_overrides
    from trainer.train.recipe import train
    opts = {"train.loss_type": "huber", "train.multires_noise_iterations": 3, "train.ip_noise_gamma": 0.1,
            "train.debiased_estimation": "true", "train.timestep_sampling": "logit_normal", "train.min_timestep": 50,
            "train.max_timestep": 950}
    losses = {}
    for name, extra in (("plain", {}), ("opts", opts)):
        seen = []
        res = train(C.load_config(None, tiny_overrides(tiny_sd1_dir, image_folder, tmp_path / name, steps=2, **extra)),
                    on_event=seen.append)
        assert res.status == "completed"
        losses[name] = [e.loss for e in seen if e.type == "step"]
    assert all(math.isfinite(v) for v in losses["opts"]) and losses["opts"] != losses["plain"]
