"""The DreamBooth training objective, kept in one place.

`diffusion_loss` returns one loss per sample (as k-diffusion's `Denoiser.loss` and
improved-diffusion's `training_losses` do). Everything that weights samples differently is an
explicit per-sample multiply, so it is right at any batch size:

- Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
  arXiv:2303.09556): each sample's loss is weighted by min(SNR(t), gamma) / SNR(t) for an
  epsilon-predicting model and min(SNR(t), gamma) / (SNR(t) + 1) for a v-predicting one, using
  that sample's own timestep.
- Prior preservation (Ruiz et al. 2022, eq. 2): class-prompt samples carry the weight lambda.
- Knowledge preservation: samples with general prompts carry their own weight mu.

Distillation. A sample may take as its target, instead of the noise (or v), the frozen base
model's prediction at the same noisy input and timestep:
    l_i = || f_theta(x_t, t, c_i) - f_base(x_t, t, c_i) ||^2
(prior.source=model on the class prompt, and knowledge preservation on general prompts). With
class images drawn from the base, the image prior's target eps has f_base(x_t, t, c) as its
expectation given x_t; distilling uses that expectation directly, so no images are needed and
the target has no noise-draw variance. The noisy input must come from somewhere: here it is the
base model's own sample for the prompt (`base_samples`: a few deterministic DDIM steps from pure
noise), noised again at the sample's own timestep. Measured in the miniature world (docs/guide/prior-preservation.md): the
subject photo as the clean input set the class prompt against the instance prompt on identical
inputs and stopped the subject from being learned (subject fidelity 0.09); pure noise (x0 = 0)
constrains only the high-noise steps and let the class drift to the subject (drift 0.28).

`combine` turns per-sample losses into the scalar we backpropagate:
    L = (sum_i w_i * l_i) / n_instance,   w_i = 1 for subject images, lambda for class images.
With as many class as subject samples this equals diffusers' `instance_loss + lambda * prior_loss`
(each a batch mean), without chunking the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import DreamBoothError


def sample_noise(shape: torch.Size, generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise (B, C, H, W) from a CPU generator; optional offset noise adds one N(0, s^2) value per channel.

    Drawing on the CPU keeps the stream identical on every device and lets a checkpoint store it.
    """
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [0, T) (B,)."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity v = a_t * eps - s_t * x0 (Salimans & Ho 2022)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise DreamBoothError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler config "
                          "(supported: epsilon, v_prediction)")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each timestep (B,)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)[timesteps.cpu()]
    return (alphas_cumprod / (1.0 - alphas_cumprod)).to(torch.float32)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weights (B,) for the scheduler's prediction type."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None = None,
    offset_noise: float = 0.0,
    teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    distilled: torch.Tensor | None = None,
) -> torch.Tensor:
    """One denoising loss per sample (B,).

    Args:
        predict: (noisy latents x_t, timesteps t) -> the model's prediction of the target; the
            model family supplies it with the conditioning bound (`ModelFamily.predict`).
        scheduler: the training noise schedule (a DDPMScheduler).
        latents: clean latents x0 (B, C, H, W).
        generator: CPU generator for noise and timesteps (saved in checkpoints for exact resume).
        snr_gamma: Min-SNR-gamma; None disables the weighting.
        offset_noise: offset-noise strength.
        teacher: (x_t, t, rows) -> the frozen base model's prediction (M, C, H, W) for x_t and t of the M
            samples selected by the (B,) mask `rows`, without gradients; the target of those samples.
        distilled: (B,) bool, the samples whose target is the teacher's prediction; None: none.
    """
    noise = sample_noise(latents.shape, generator, offset_noise).to(latents.device, latents.dtype)
    timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator).to(latents.device)
    per_sample = denoising_loss(predict, scheduler, latents, noise, timesteps, teacher, distilled)  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma).to(per_sample.device)
    return per_sample


def denoising_loss(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, latents: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, teacher=None,
                   distilled: torch.Tensor | None = None) -> torch.Tensor:
    """The unweighted per-sample MSE (B,) for given noise and timesteps (training draws them; the drift probe fixes them)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, H, W)
    prediction = predict(noisy, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    if distilled is not None and bool(distilled.any()):
        rows = distilled.to(target.device)
        with torch.no_grad():
            target = target.clone()
            target[rows] = teacher(noisy[rows], timesteps[rows], rows).to(target.dtype)
    # MSE in fp32 whatever the autocast dtype: the per-sample means are what we weight.
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)


def distilled_samples(is_prior: torch.Tensor, is_preserve: torch.Tensor | None, prior_from_model: bool) -> torch.Tensor | None:
    """The samples whose target is the base model's prediction (B,): class samples with prior.source=model,
    and knowledge-preservation samples; None when there are none."""
    rows = is_prior if prior_from_model else torch.zeros_like(is_prior)
    if is_preserve is not None:
        rows = rows | is_preserve
    return rows if bool(rows.any()) else None


def x0_and_eps(scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor):
    """The clean sample and the noise that a prediction implies at x_t (epsilon or v; Salimans & Ho 2022):
    x0 = (x_t - s_t eps) / a_t for epsilon, x0 = a_t x_t - s_t v and eps = a_t v + s_t x_t for v."""
    abar = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, *[1] * (noisy.dim() - 1))
    a, s = abar.sqrt(), (1 - abar).sqrt()
    prediction = prediction.float()
    if scheduler.config.prediction_type == "v_prediction":
        return a * noisy - s * prediction, a * prediction + s * noisy
    return (noisy - s * prediction) / a, prediction


def base_samples(teacher, scheduler, shape: torch.Size, rows: torch.Tensor, generator: torch.Generator,
                 steps: int, device=None) -> torch.Tensor:
    """The frozen base's own samples for the samples `rows` (M, C, H, W): deterministic DDIM (Song et al. 2021,
    eta = 0) from pure noise x_T in `steps` evenly spaced steps, returning the last step's predicted x0.

    `teacher` is diffusion_loss's: (x_t, t of the M rows, the (B,) mask `rows`) -> the base's prediction."""
    m, T = int(rows.sum()), scheduler.config.num_train_timesteps
    x = torch.randn((m, *shape[1:]), generator=generator).to(device)  # x_T
    ts = [T - 1 - (i * T) // steps for i in range(steps)]  # e.g. 999, 749, 499, 249 for 4 steps
    for i, t in enumerate(ts):
        timesteps = torch.full((m,), t, dtype=torch.long, device=device)
        x0, eps = x0_and_eps(scheduler, x, timesteps, teacher(x, timesteps, rows))
        if i + 1 < len(ts):
            abar_next = scheduler.alphas_cumprod[ts[i + 1]].to(torch.float32)
            x = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps
    return x0


def sample_weights(is_prior: torch.Tensor, prior_loss_weight: float, is_preserve: torch.Tensor | None = None,
                   preserve_weight: float = 0.0) -> torch.Tensor:
    """w_i = 1 for subject samples, lambda for class (prior) samples, mu for knowledge-preservation samples (B,)."""
    weights = torch.where(is_prior, torch.as_tensor(prior_loss_weight), torch.as_tensor(1.0)).float()
    if is_preserve is not None:
        weights = torch.where(is_preserve, torch.as_tensor(preserve_weight, dtype=torch.float32), weights)
    return weights


def combine(per_sample: torch.Tensor, is_prior: torch.Tensor, prior_loss_weight: float,
            is_preserve: torch.Tensor | None = None, preserve_weight: float = 0.0) -> torch.Tensor:
    """sum_i w_i l_i / n_instance: equals instance_mean + lambda * prior_mean (+ mu * preserve_mean) for
    equal-sized groups."""
    weights = sample_weights(is_prior, prior_loss_weight, is_preserve, preserve_weight).to(per_sample.device)
    n_instance = int((~is_prior).sum()) - (int(is_preserve.sum()) if is_preserve is not None else 0)
    return (per_sample * weights).sum() / max(n_instance, 1)
