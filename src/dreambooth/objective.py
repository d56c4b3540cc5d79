"""The DreamBooth training objective, kept in one place.

`diffusion_loss` returns one loss per sample (as k-diffusion's `Denoiser.loss` and
improved-diffusion's `training_losses` do). Everything that weights samples differently is an
explicit per-sample multiply, so it is right at any batch size:

- Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
  arXiv:2303.09556): each sample's loss is weighted by min(SNR(t), gamma) / SNR(t) for an
  epsilon-predicting model and min(SNR(t), gamma) / (SNR(t) + 1) for a v-predicting one, using
  that sample's own timestep.
- Prior preservation (Ruiz et al. 2022, eq. 2): class-image samples carry the weight lambda.

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
    """
    noise = sample_noise(latents.shape, generator, offset_noise).to(latents.device, latents.dtype)
    timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator).to(latents.device)
    per_sample = denoising_loss(predict, scheduler, latents, noise, timesteps)  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma).to(per_sample.device)
    return per_sample


def denoising_loss(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, latents: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The unweighted per-sample MSE (B,) for given noise and timesteps (training draws them; the drift probe fixes them)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, H, W)
    prediction = predict(noisy, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    # MSE in fp32 whatever the autocast dtype: the per-sample means are what we weight.
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)


def sample_weights(is_prior: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """w_i = 1 for subject samples, lambda for class (prior) samples (B,)."""
    return torch.where(is_prior, torch.as_tensor(prior_loss_weight), torch.as_tensor(1.0)).float()


def combine(per_sample: torch.Tensor, is_prior: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """sum_i w_i l_i / n_instance: equals instance_mean + lambda * prior_mean for equal-sized halves."""
    weights = sample_weights(is_prior.to(per_sample.device), prior_loss_weight).to(per_sample.device)
    n_instance = int((~is_prior).sum())
    return (per_sample * weights).sum() / max(n_instance, 1)
