"""The training objective and the DDPM schedule against hand computations and diffusers: targets, SNR,
Min-SNR weights, prior weighting, the loss.

Min-SNR-gamma: Hang et al. 2023 (arXiv:2303.09556). Prior preservation: Ruiz et al. 2022, eq. 2.
The schedule is SD 1.x's (scaled_linear, 0.00085..0.012, 1000 steps), as in the tiny test model.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from dreambooth import objective
from dreambooth.config import ObjectiveConfig
from dreambooth.errors import DreamBoothError
from dreambooth.schedule import DDPMSchedule


def make_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def make_schedule(prediction_type: str = "epsilon") -> DDPMSchedule:
    return DDPMSchedule(make_scheduler(prediction_type))


def min_snr(gamma: float = 5.0) -> ObjectiveConfig:
    return ObjectiveConfig(snr_gamma=gamma)


def abar_by_hand(t: int) -> float:
    """alpha_bar_t for SD's scaled_linear schedule, in float64 from first principles."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    return float(torch.prod(1.0 - betas[: t + 1]))


TIMESTEPS = [0, 10, 100, 300, 500, 999]
GAMMA = 5.0


# ---- targets ---------------------------------------------------------------------------

def test_epsilon_target_is_the_noise():
    sched = make_schedule("epsilon")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 500, 990])
    target = sched.target(x0, noise, t)
    torch.testing.assert_close(target, noise, rtol=0, atol=0)


def test_v_target_matches_get_velocity_and_hand_formula():
    sched = make_schedule("v_prediction")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 500, 990])
    target = sched.target(x0, noise, t)
    torch.testing.assert_close(target, make_scheduler("v_prediction").get_velocity(x0, noise, t), rtol=0, atol=0)
    abar = torch.tensor([abar_by_hand(int(ti)) for ti in t], dtype=torch.float64).view(-1, 1, 1, 1)
    by_hand = (abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()).float()  # v = a_t eps - s_t x0
    torch.testing.assert_close(target, by_hand, rtol=1e-4, atol=1e-5)
    # and it is not the noise (the two targets must really differ)
    assert not torch.allclose(target, noise, atol=1e-2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_input_is_diffusers_add_noise_bit_for_bit(prediction_type):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, exactly as DDPMScheduler.add_noise computes it (and by hand)."""
    g = torch.Generator().manual_seed(2)
    x0, noise, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 421, 999])
    got = make_schedule(prediction_type).noisy(x0, noise, t)
    torch.testing.assert_close(got, make_scheduler(prediction_type).add_noise(x0, noise, t), rtol=0, atol=0)
    abar = torch.tensor([abar_by_hand(int(ti)) for ti in t], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(got, (abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()).float(),
                               rtol=1e-4, atol=1e-5)


def test_ddpm_timesteps_are_uniform_integers_from_the_generator():
    sched = make_schedule()
    got = sched.sample_t(4096, torch.Generator().manual_seed(3), torch.Size((4096, 4, 2, 2)), ObjectiveConfig())
    torch.testing.assert_close(got, torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(3)),
                               rtol=0, atol=0)
    assert got.dtype == torch.int64 and got.min() >= 0 and got.max() <= 999 and abs(got.float().mean() - 499.5) < 15


def test_unsupported_prediction_type_names_it():
    with pytest.raises(DreamBoothError, match="sample"):
        make_schedule("sample")


# ---- SNR and Min-SNR weights -------------------------------------------------------------

def test_snr_by_hand():
    sched = make_schedule()
    got = sched.snr(torch.tensor(TIMESTEPS))
    assert got.shape == (len(TIMESTEPS),)
    for value, t in zip(got.tolist(), TIMESTEPS):
        abar = abar_by_hand(t)
        assert value == pytest.approx(abar / (1 - abar), rel=1e-4)
    # the schedule runs from nearly clean to nearly pure noise
    assert got[0] > 1000 and got[-1] < 0.01
    assert torch.all(got[:-1] > got[1:])


def _hand_weights(t_list, prediction_type):
    out = []
    for t in t_list:
        abar = abar_by_hand(t)
        s = abar / (1 - abar)
        out.append(min(s, GAMMA) / (s + 1 if prediction_type == "v_prediction" else s))
    return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_by_hand(prediction_type):
    sched = make_schedule(prediction_type)
    t = torch.tensor(TIMESTEPS)
    s = sched.snr(t)
    # the chosen timesteps straddle gamma, so both branches of the min are exercised
    assert (s > GAMMA).any() and (s < GAMMA).any()
    assert sched.weight(t, ObjectiveConfig()) is None  # no snr_gamma: no weighting at all
    got = sched.weight(t, min_snr(GAMMA))
    assert got.shape == (len(TIMESTEPS),)
    assert got.tolist() == pytest.approx(_hand_weights(TIMESTEPS, prediction_type), rel=1e-4)
    if prediction_type == "epsilon":
        assert torch.all(got[s <= GAMMA] == 1.0)  # exactly 1 where snr < gamma
        assert torch.all(got[s > GAMMA] < 1.0)
    else:
        torch.testing.assert_close(got[s <= GAMMA], (s / (s + 1))[s <= GAMMA])


# ---- combining per-sample losses ------------------------------------------------------------

def test_combine_without_prior_is_the_mean():
    losses = torch.tensor([0.5, 1.5, 4.0])
    no_prior = torch.zeros(3, dtype=torch.bool)
    assert objective.combine(losses, no_prior, 0.7).item() == pytest.approx(2.0)


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_combine_with_prior_equals_diffusers_chunked_formula(lam):
    g = torch.Generator().manual_seed(3)
    losses = torch.rand(6, generator=g)  # 3 subject then 3 class samples, as DreamBoothData builds them
    is_prior = torch.tensor([False] * 3 + [True] * 3)
    instance, prior = torch.chunk(losses, 2)
    expected = instance.mean() + lam * prior.mean()
    torch.testing.assert_close(objective.combine(losses, is_prior, lam), expected)


def _hand_min_snr_prior_loss(mse, t, is_prior, lam, prediction_type):
    """mean_i(w_i mse_i over subject) + lambda * mean_j(w_j mse_j over class), each w from its own t."""
    w = _hand_weights(t, prediction_type)
    inst = [wi * mi for wi, mi, p in zip(w, mse, is_prior) if not p]
    cls = [wi * mi for wi, mi, p in zip(w, mse, is_prior) if p]
    return sum(inst) / len(inst) + lam * sum(cls) / len(cls)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_with_prior_batch_2_matches_hand(prediction_type):
    sched = make_schedule(prediction_type)
    mse = [0.9, 0.4, 0.7, 1.3]  # 2 subject + 2 class per-sample MSEs
    t = [10, 800, 300, 999]  # high-snr and low-snr timesteps in each half
    is_prior = torch.tensor([False, False, True, True])
    lam = 0.5
    weighted = torch.tensor(mse) * sched.weight(torch.tensor(t), min_snr(GAMMA))
    got = objective.combine(weighted, is_prior, lam)
    expected = _hand_min_snr_prior_loss(mse, t, is_prior.tolist(), lam, prediction_type)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_min_snr_with_prior_batch_1_matches_hand():
    sched = make_schedule()
    mse, t, lam = [0.9, 0.6], [10, 900], 1.0
    is_prior = torch.tensor([False, True])
    weighted = torch.tensor(mse) * sched.weight(torch.tensor(t), min_snr(GAMMA))
    got = objective.combine(weighted, is_prior, lam)
    expected = _hand_min_snr_prior_loss(mse, t, [False, True], lam, "epsilon")
    assert got.item() == pytest.approx(expected, rel=1e-5)


def _diffusers_formula(sched, mse, t, lam):
    """diffusers' train_dreambooth.py with --snr_gamma and prior preservation: weights over all 2B
    timesteps multiply the B instance losses, and the prior loss is left unweighted."""
    mse = torch.tensor(mse)
    instance, prior = torch.chunk(mse, 2)
    s = sched.snr(torch.tensor(t))  # (2B,)
    weights = torch.stack([s, GAMMA * torch.ones_like(s)], dim=1).min(dim=1)[0] / s  # (2B,)
    loss = (instance * weights).mean()  # (B,) * (2B,)
    return loss + lam * prior.mean()


def test_diffusers_min_snr_prior_formula_is_wrong_but_ours_is_right():
    sched = make_schedule()
    # batch 1: (1,) * (2,) broadcasts silently to a different value
    mse, t = [0.9, 0.6], [10, 900]
    hand = _hand_min_snr_prior_loss(mse, t, [False, True], 1.0, "epsilon")
    theirs = _diffusers_formula(sched, mse, t, 1.0).item()
    ours = objective.combine(torch.tensor(mse) * sched.weight(torch.tensor(t), min_snr(GAMMA)),
                             torch.tensor([False, True]), 1.0).item()
    assert ours == pytest.approx(hand, rel=1e-5)
    assert abs(theirs - hand) > 1e-2
    # batch 2: (2,) * (4,) does not broadcast at all
    with pytest.raises(RuntimeError):
        _diffusers_formula(sched, [0.9, 0.4, 0.7, 1.3], [10, 800, 300, 999], 1.0)


# ---- noise ---------------------------------------------------------------------------------

def test_offset_noise_adds_a_per_sample_channel_constant():
    shape = torch.Size((2, 4, 8, 8))
    plain = objective.sample_noise(shape, torch.Generator().manual_seed(7))
    torch.testing.assert_close(plain, torch.randn(shape, generator=torch.Generator().manual_seed(7)), rtol=0, atol=0)
    offset = objective.sample_noise(shape, torch.Generator().manual_seed(7), offset_noise=0.1)
    diff = offset - plain  # (B, C, H, W), constant over H, W
    per_channel = diff[:, :, :1, :1]
    torch.testing.assert_close(diff, per_channel.expand_as(diff), rtol=0, atol=1e-6)
    assert per_channel.abs().min() > 0  # every (sample, channel) got its own nonzero offset
    assert per_channel.flatten().unique().numel() == 8
    # the offset is 0.1 * the generator's next N(0, 1) draws
    g = torch.Generator().manual_seed(7)
    torch.randn(shape, generator=g)
    torch.testing.assert_close(per_channel, 0.1 * torch.randn(2, 4, 1, 1, generator=g), rtol=0, atol=1e-6)


# ---- the loss with a real (tiny) UNet ---------------------------------------------------

@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def unet_and_scheduler(request):
    model_dir = request.getfixturevalue("tiny_sd_dir" if request.param == "epsilon" else "tiny_sd_v_dir")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    assert sched.config.prediction_type == request.param
    return unet, DDPMSchedule(sched)


def _inputs(batch=2):
    g = torch.Generator().manual_seed(11)
    return torch.randn(batch, 4, 16, 16, generator=g), {"encoder_hidden_states": torch.randn(batch, 77, 32, generator=g)}


def _loss(unet, sched, latents, cond, seed: int, settings: ObjectiveConfig | None = None) -> torch.Tensor:
    """objective.diffusion_loss of the tiny UNet with the conditioning `cond`, its noise and timesteps from `seed`."""
    return objective.diffusion_loss(lambda x, t: unet(x, t, **cond).sample, sched, latents,
                                    torch.Generator().manual_seed(seed), settings or ObjectiveConfig())


def test_diffusion_loss_shape_and_determinism(unet_and_scheduler):
    unet, sched = unet_and_scheduler
    latents, cond = _inputs()
    with torch.no_grad():
        a, b, c = (_loss(unet, sched, latents, cond, seed) for seed in (0, 0, 1))
    assert a.shape == (2,) and a.dtype == torch.float32
    assert torch.all(a > 0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_diffusion_loss_equals_manual_recomputation(unet_and_scheduler):
    unet, sched = unet_and_scheduler
    latents, cond = _inputs()
    with torch.no_grad():
        got = _loss(unet, sched, latents, cond, 5)
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(latents.shape, generator=g)  # the noise first, then the timesteps
        t = torch.randint(0, 1000, (2,), generator=g)
        noisy = sched.scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        target = noise if sched.prediction_type == "epsilon" else sched.scheduler.get_velocity(latents, noise, t)
        expected = torch.stack([F.mse_loss(pred[i], target[i]) for i in range(2)])
        weighted = _loss(unet, sched, latents, cond, 5, min_snr(GAMMA))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Min-SNR weighting is a per-sample multiply with each sample's own timestep
    torch.testing.assert_close(weighted, expected * sched.weight(t, min_snr(GAMMA)), rtol=1e-5, atol=1e-6)


def test_diffusion_loss_with_offset_noise_uses_the_offset_noise(unet_and_scheduler):
    unet, sched = unet_and_scheduler
    latents, cond = _inputs()
    with torch.no_grad():
        got = _loss(unet, sched, latents, cond, 5, ObjectiveConfig(offset_noise=0.1))
        plain = _loss(unet, sched, latents, cond, 5)
        g = torch.Generator().manual_seed(5)
        noise = objective.sample_noise(latents.shape, g, 0.1)
        t = torch.randint(0, 1000, (2,), generator=g)
        pred = unet(sched.scheduler.add_noise(latents, noise, t), t, **cond).sample
        target = sched.target(latents, noise, t)
        expected = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain)
