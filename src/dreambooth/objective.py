"""The DreamBooth training objective, kept in one place.

`diffusion_loss` returns one loss per sample (as k-diffusion's `Denoiser.loss` and
improved-diffusion's `training_losses` do). The diffusion maths (how t is drawn, the noisy input,
the target, the per-timestep weight) is the model's noise schedule's (`schedule.py`: DDPM or
rectified flow), which the family supplies; this module only asks it. Everything that weights
samples differently is an explicit per-sample multiply, so it is right at any batch size:

- the schedule's weight of each sample's own timestep: Min-SNR-gamma for DDPM (Hang et al. 2023,
  arXiv:2303.09556), sigma_sqrt or cosmap for rectified flow (Esser et al. 2024);
- prior preservation (Ruiz et al. 2022, eq. 2): class-prompt samples carry the weight lambda;
- knowledge preservation: samples with general prompts carry their own weight mu.

Distillation. A sample may take as its target, instead of the schedule's, the frozen base model's
prediction at the same noisy input and timestep:
    l_i = || f_theta(x_t, t, c_i) - f_base(x_t, t, c_i) ||^2
(prior.source=model on the class prompt, and knowledge preservation on general prompts). With
class images drawn from the base, the image prior's target has f_base(x_t, t, c) as its
expectation given x_t; distilling uses that expectation directly, so no images are needed and
the target has no noise-draw variance. The noisy input must come from somewhere: here it is the
base model's own sample for the prompt (`base_samples`: a few deterministic steps from pure
noise), noised again at the sample's own timestep. Measured in the miniature world
(docs/guide/prior-preservation.md): the
subject photo as the clean input set the class prompt against the instance prompt on identical
inputs and stopped the subject from being learned (subject fidelity 0.09); pure noise (x0 = 0)
constrains only the high-noise steps and let the class drift to the subject (drift 0.28).

`combine` turns per-sample losses into the scalar we backpropagate:
    L = (sum_i w_i * l_i) / n_instance,   w_i = 1 for subject images, lambda for class images.
With as many class as subject samples this equals diffusers' `instance_loss + lambda * prior_loss`
(each a batch mean), without chunking the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .config import ObjectiveConfig

if TYPE_CHECKING:
    from .schedule import NoiseSchedule


def sample_noise(shape: torch.Size, generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise (B, C, H, W) from a CPU generator; optional offset noise adds one N(0, s^2) value per channel.

    Drawing on the CPU keeps the stream identical on every device and lets a checkpoint store it.
    """
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator,
    objective: ObjectiveConfig,
    teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    distilled: torch.Tensor | None = None,
) -> torch.Tensor:
    """One denoising loss per sample (B,).

    Args:
        predict: (noisy latents x_t, timesteps t) -> the model's prediction of the target; the
            model family supplies it with the conditioning bound (`ModelFamily.predict`).
        schedule: the model's noise schedule (`ModelFamily.schedule`).
        x0: clean latents (B, C, H, W).
        generator: CPU generator for noise and timesteps (saved in checkpoints for exact resume);
            the noise is drawn first, then the timesteps.
        objective: the objective settings (offset noise, and what the schedule weights with).
        teacher: (x_t, t, rows) -> the frozen base model's prediction (M, C, H, W) for x_t and t of the M
            samples selected by the (B,) mask `rows`, without gradients; the target of those samples.
        distilled: (B,) bool, the samples whose target is the teacher's prediction; None: none.
    """
    noise = sample_noise(x0.shape, generator, objective.offset_noise).to(x0.device, x0.dtype)
    t = schedule.sample_t(x0.shape[0], generator, x0.shape, objective).to(x0.device)  # (B,)
    per_sample = denoising_loss(predict, schedule, x0, noise, t, teacher, distilled)  # (B,)
    weights = schedule.weight(t, objective)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample


def denoising_loss(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                   x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, teacher=None,
                   distilled: torch.Tensor | None = None) -> torch.Tensor:
    """The unweighted per-sample MSE (B,) for given noise and timesteps (training draws them; the drift probe fixes them)."""
    noisy = schedule.noisy(x0, noise, t)  # (B, C, H, W)
    prediction = predict(noisy, t)
    target = schedule.target(x0, noise, t)
    if distilled is not None and bool(distilled.any()):
        rows = distilled.to(target.device)
        with torch.no_grad():
            target = target.clone()
            target[rows] = teacher(noisy[rows], t[rows], rows).to(target.dtype)
    # MSE in fp32 whatever the autocast dtype: the per-sample means are what we weight.
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)


def distilled_samples(is_prior: torch.Tensor, is_preserve: torch.Tensor | None, prior_from_model: bool) -> torch.Tensor | None:
    """The samples whose target is the base model's prediction (B,): class samples with prior.source=model,
    and knowledge-preservation samples; None when there are none."""
    rows = is_prior if prior_from_model else torch.zeros_like(is_prior)
    if is_preserve is not None:
        rows = rows | is_preserve
    return rows if bool(rows.any()) else None


def base_samples(teacher, schedule: NoiseSchedule, shape: torch.Size, rows: torch.Tensor, generator: torch.Generator,
                 steps: int, device=None) -> torch.Tensor:
    """The frozen base's own samples for the samples `rows` (M, C, H, W): `steps` deterministic steps from pure
    noise at the schedule's `sampling_t` (DDIM with eta = 0 for DDPM, Song et al. 2021; Euler steps of the flow
    for rectified flow), returning the last step's predicted x0. Each step re-noises the predicted x0 with the
    predicted noise to the next timestep.

    `teacher` is diffusion_loss's: (x_t, t of the M rows, the (B,) mask `rows`) -> the base's prediction."""
    m = int(rows.sum())
    x = torch.randn((m, *shape[1:]), generator=generator).to(device)  # pure noise
    ts = schedule.sampling_t(steps, shape)  # e.g. 999, 749, 499, 249 for 4 DDPM steps
    for i in range(len(ts)):
        t = ts[i].repeat(m).to(device)
        x0, eps = schedule.x0_and_noise(x, t, teacher(x, t, rows))
        if i + 1 < len(ts):
            x = schedule.noisy(x0, eps, ts[i + 1].repeat(m).to(device))
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
