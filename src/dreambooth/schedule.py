"""The noise schedule: how a family's model was trained to denoise, as one small object.

DDPM (SD 1.x/2.x, SDXL, DeepFloyd IF) and rectified flow (SD3, FLUX.1) differ in how the noise
level t is drawn, what the noisy input and the target are, how samples are weighted and which
samplers can render them. The family supplies its schedule (`ModelFamily.schedule`, built from
the folder's scheduler/scheduler_config.json before any weight loads), and the objective, the drift
probe and the model prior ask it, never a diffusers scheduler (k-diffusion's model wrappers are the
pattern: the loss knows the wrapper, the wrapper knows the model).

t is always the timestep the denoiser is called with: an integer step in [0, T) for DDPM, and
sigma * T (a float) for rectified flow, with T = num_train_timesteps (1000), as diffusers' SD3 and
Flux pipelines call their transformers.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

from .errors import DreamBoothError

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from .config import ObjectiveConfig


class NoiseSchedule(Protocol):
    kind: str  # "DDPM" | "rectified flow", for messages
    samplers: tuple[str, ...]  # the sampler names (validation.scheduler, prior.scheduler, sample --scheduler) it renders with

    def check(self, objective: "ObjectiveConfig", where: str) -> None:
        """Refuse objective settings that mean nothing on this schedule, naming the flag; `where` names the model."""

    def sample_t(self, n: int, generator: torch.Generator, latent_shape: torch.Size,
                 objective: "ObjectiveConfig") -> torch.Tensor:
        """(N,) training timesteps for latents of `latent_shape`, drawn from `generator` (CPU)."""

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, C, H, W): the clean input x0 noised to t."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser predicts at x_t (N, C, H, W)."""

    def weight(self, t: torch.Tensor, objective: "ObjectiveConfig") -> torch.Tensor | None:
        """(N,) per-sample loss weights; None: every sample weighs 1."""

    def x0_and_noise(self, x_t: torch.Tensor, t: torch.Tensor,
                     prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean sample and the noise (fp32) that a prediction at (x_t, t) implies."""

    def probe_t(self, n: int) -> torch.Tensor:
        """(n,) timesteps spread evenly over the noise levels (the drift probe)."""

    def sampling_t(self, steps: int, latent_shape: torch.Size) -> torch.Tensor:
        """(steps,) descending timesteps from pure noise, for a few-step deterministic sample (the model prior)."""

    def sampler(self, name: str, base_config, flag: str) -> "SchedulerMixin":
        """The sampler called `name`, built from `base_config` (the folder's own sampler's config); `flag` is
        the setting that named it, for the refusal of a sampler this schedule cannot use."""


# ---- DDPM ---------------------------------------------------------------------------------

DDPM_SAMPLERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddpm": DDPMScheduler,
}
"""Sampler names for DDPM-trained models (configs and the command line), mapped to diffusers classes."""

# Settings that make a class behave as the sampler its name promises, whatever the base config
# says. DPMSolverMultistepScheduler also implements plain DPM-Solver and the SDE variants. PNDM
# without skip_prk_steps runs Runge-Kutta warm-up steps that fail below ~5 steps and are not what
# Stable Diffusion ships (its scheduler_config.json sets skip_prk_steps: true, i.e. PLMS).
_DDPM_OVERRIDES: dict[str, dict] = {
    "dpm++": {"algorithm_type": "dpmsolver++"},
    "pndm": {"skip_prk_steps": True},
}

# ObjectiveConfig fields that only a rectified-flow schedule reads
FLOW_SETTINGS = ("timestep_density", "logit_mean", "logit_std", "mode_scale", "weighting", "shift")


class DDPMSchedule:
    """Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", arXiv:2006.11239), over the folder's
    DDPMScheduler: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4), t uniform over the T steps,
    the target eps (eq. 14) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022,
    "Progressive Distillation", arXiv:2202.00512), and Min-SNR-gamma weights (Hang et al. 2023,
    arXiv:2303.09556). The noising and v are diffusers' own `add_noise` and `get_velocity`."""

    kind = "DDPM"

    def __init__(self, scheduler: DDPMScheduler):
        self.scheduler = scheduler
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DreamBoothError(f"unsupported prediction_type {self.prediction_type!r} in the model's scheduler config "
                                  "(supported: epsilon, v_prediction)")
        self.samplers = tuple(DDPM_SAMPLERS)

    @classmethod
    def from_folder(cls, model_dir: Path, subfolder: str = "scheduler") -> "DDPMSchedule":
        return cls(DDPMScheduler.from_pretrained(model_dir, subfolder=subfolder))

    def check(self, objective: "ObjectiveConfig", where: str) -> None:
        changed = objective.changed(FLOW_SETTINGS)
        if changed:
            raise DreamBoothError(f"objective.{changed[0]}={getattr(objective, changed[0])} applies to rectified-flow "
                                  f"models, but {where} trains with a DDPM schedule (its scheduler/scheduler_config.json): "
                                  "remove it (DDPM draws its timesteps uniformly; objective.snr_gamma weights them)")

    def sample_t(self, n, generator, latent_shape, objective) -> torch.Tensor:
        """Uniform integer timesteps in [0, T) (N,)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def noisy(self, x0, noise, t) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) of each timestep (N,), computed in fp64."""
        abar = self.scheduler.alphas_cumprod.to(torch.float64)[t.cpu()]
        return (abar / (1.0 - abar)).to(torch.float32)

    def weight(self, t, objective) -> torch.Tensor | None:
        """Min-SNR-gamma: min(SNR, gamma) / SNR for an epsilon model, min(SNR, gamma) / (SNR + 1) for a v model."""
        if objective.snr_gamma is None:
            return None
        s = self.snr(t)
        clipped = torch.clamp(s, max=objective.snr_gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (s + 1.0)
        return clipped / s

    def x0_and_noise(self, x_t, t, prediction):
        """x0 = (x_t - s_t eps) / a_t for epsilon; x0 = a_t x_t - s_t v and eps = a_t v + s_t x_t for v
        (a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t))."""
        abar = self.scheduler.alphas_cumprod.to(x_t.device, torch.float32)[t].view(-1, *[1] * (x_t.dim() - 1))
        a, s = abar.sqrt(), (1 - abar).sqrt()
        prediction = prediction.float()
        if self.prediction_type == "v_prediction":
            return a * x_t - s * prediction, a * prediction + s * x_t
        return (x_t - s * prediction) / a, prediction

    def probe_t(self, n: int) -> torch.Tensor:
        """The centres of n equal slices of [0, T): 1000 steps, n = 4 -> 125, 375, 625, 875."""
        return torch.tensor([int((i + 0.5) * self.num_train_timesteps / n) for i in range(n)])

    def sampling_t(self, steps: int, latent_shape=None) -> torch.Tensor:
        """DDIM's evenly spaced steps (Song et al. 2021): 999, 749, 499, 249 for 4 steps of 1000."""
        T = self.num_train_timesteps
        return torch.tensor([T - 1 - (i * T) // steps for i in range(steps)])

    def sampler(self, name: str, base_config, flag: str = "scheduler"):
        return ddpm_sampler(name, base_config, flag)


def ddpm_sampler(name: str, base_config, flag: str = "scheduler"):
    """The DDPM sampler called `name`, built from a model's scheduler config.

    Building from the model's own config keeps what the model was trained with (betas, prediction
    type, timestep spacing); only the sampling algorithm changes.

    Raises:
        DreamBoothError: If `name` is unknown, or its class needs a package that is not installed.

    Examples:
        >>> ddpm_sampler("euler", pipe.scheduler.config).config.prediction_type
        'epsilon'
    """
    if name not in DDPM_SAMPLERS:
        raise DreamBoothError(f"unknown scheduler {name!r} ({flag}); choose one of: {', '.join(DDPM_SAMPLERS)}")
    if base_config.get("variance_type") in ("learned", "learned_range") and \
            "variance_type" not in inspect.signature(DDPM_SAMPLERS[name].__init__).parameters:
        # A model with a learned variance (DeepFloyd IF) under a sampler that cannot use it: the
        # pipelines drop the variance half of the output only when the config says it is not learned
        # (from_config keeps a key the class does not take, so it is replaced in the config itself).
        base_config = {**base_config, "variance_type": "fixed_small"}
    try:
        return DDPM_SAMPLERS[name].from_config(base_config, **_DDPM_OVERRIDES.get(name, {}))
    except ImportError as err:
        # diffusers swaps classes with missing extras (LMS needs scipy) for stubs that raise here.
        raise DreamBoothError(
            f"scheduler {name!r} needs a package that is not installed ({' '.join(str(err).split())}); install it, "
            f"or choose another of: {', '.join(n for n in DDPM_SAMPLERS if n != name)}"
        ) from err


# ---- rectified flow --------------------------------------------------------------------------

FLOW_SAMPLERS: dict[str, type] = {"euler": FlowMatchEulerDiscreteScheduler}
"""Sampler names for rectified-flow models: Euler steps of the flow's ODE."""

def shifted(sigma: torch.Tensor, alpha: float) -> torch.Tensor:
    """Esser et al. 2024, section 5.3.2: sigma -> alpha sigma / (1 + (alpha - 1) sigma), which moves the noise
    levels towards more noise for alpha > 1 (a larger image keeps more of its signal at the same sigma)."""
    return alpha * sigma / (1 + (alpha - 1) * sigma)


class FlowMatchSchedule:
    """Rectified flow (Liu et al. 2022, "Flow Straight and Fast", arXiv:2209.03003), as SD3 trains it (Esser et
    al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv:2403.03206):
    x_t = (1 - s) x0 + s eps at noise level s = sigma in (0, 1], the target the velocity eps - x0.

    s is drawn from a density on (0, 1) (section 3.1: logit-normal, mode with heavy tails, or uniform) and then
    shifted (section 5.3.2): by the scheduler config's static `shift`, or, with its `use_dynamic_shifting`,
    by exp(mu) with mu linear in the latent's sequence length (FluxPipeline's `calculate_shift`).
    The model is called with t = s * T. Samplers: FlowMatchEulerDiscreteScheduler."""

    kind = "rectified flow"

    def __init__(self, config, patch_size: int = 1):
        """`config`: the folder's FlowMatchEulerDiscreteScheduler config; `patch_size`: latent pixels per token
        side (SD3, Flux: 2), for the sequence length the resolution-dependent shift reads."""
        self.config = dict(config)
        self.num_train_timesteps = self.config.get("num_train_timesteps", 1000)
        self.shift = float(self.config.get("shift", 1.0))
        self.dynamic = bool(self.config.get("use_dynamic_shifting", False))
        self.time_shift_type = self.config.get("time_shift_type", "exponential")
        if self.time_shift_type not in ("exponential", "linear"):
            raise DreamBoothError(f"unsupported time_shift_type {self.time_shift_type!r} in the model's scheduler config "
                                  "(supported: exponential, linear)")
        self.patch_size = patch_size
        self.samplers = tuple(FLOW_SAMPLERS)

    @classmethod
    def from_folder(cls, model_dir: Path, patch_size: int = 1, subfolder: str = "scheduler") -> "FlowMatchSchedule":
        return cls(FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder=subfolder).config, patch_size)

    def check(self, objective: "ObjectiveConfig", where: str) -> None:
        if objective.snr_gamma is not None:
            raise DreamBoothError(f"objective.snr_gamma={objective.snr_gamma} (Min-SNR) weights DDPM timesteps by their "
                                  f"signal-to-noise ratio, but {where} trains by rectified flow: remove it "
                                  "(objective.weighting=sigma_sqrt or cosmap weights a flow's noise levels)")
        if objective.offset_noise:
            raise DreamBoothError(f"objective.offset_noise={objective.offset_noise} works around a DDPM schedule that "
                                  f"never reaches pure noise, but {where} trains by rectified flow, which does (sigma = 1): "
                                  "remove it")

    def alpha(self, latent_shape: torch.Size) -> float:
        """The folder's shift for latents of `latent_shape` (N, C, h, w): static, or from their sequence length."""
        if not self.dynamic:
            return self.shift
        c = self.config
        seq_len = (latent_shape[-2] // self.patch_size) * (latent_shape[-1] // self.patch_size)
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base_shift, max_shift = c.get("base_shift") or 0.5, c.get("max_shift") or 1.15
        m = (max_shift - base_shift) / (max_len - base_len)  # mu is linear in the sequence length
        mu = seq_len * m + (base_shift - m * base_len)
        # diffusers' time shifts: exponential e^mu / (e^mu + 1/s - 1), linear mu / (mu + 1/s - 1), both
        # the static shift above with alpha = e^mu or mu
        return math.exp(mu) if self.time_shift_type == "exponential" else mu

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Noise levels s = t / T, shaped (N, 1, 1, 1) to broadcast over `like`."""
        return (t.to(like.device, torch.float32) / self.num_train_timesteps).view(-1, *[1] * (like.dim() - 1))

    def sample_t(self, n, generator, latent_shape, objective) -> torch.Tensor:
        density = objective.timestep_density
        if density == "logit_normal":  # sigmoid(N(m, s)): most samples at middle noise levels
            u = torch.sigmoid(torch.normal(objective.logit_mean, objective.logit_std, (n,), generator=generator))
        elif density == "mode":  # f(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u), u uniform: maps [0, 1) onto (0, 1]
            u = torch.rand(n, generator=generator)
            u = 1 - u - objective.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:  # uniform on (0, 1]: 1 - U[0, 1) never draws s = 0, which sigma_sqrt's 1 / s^2 cannot weigh
            u = 1 - torch.rand(n, generator=generator)
        alpha = objective.shift if objective.shift is not None else self.alpha(latent_shape)
        return shifted(u, alpha) * self.num_train_timesteps

    def noisy(self, x0, noise, t) -> torch.Tensor:
        s = self.sigma(t, x0).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t) -> torch.Tensor:
        return noise - x0

    def weight(self, t, objective) -> torch.Tensor | None:
        """sigma_sqrt: 1 / s^2; cosmap: 2 / (pi (1 - 2 s + 2 s^2)) (section 3.1's CosMap); none: None.
        As diffusers.training_utils.compute_loss_weighting_for_sd3 at 58eb52c."""
        if objective.weighting == "none":
            return None
        s = t.float() / self.num_train_timesteps
        if objective.weighting == "sigma_sqrt":
            return s ** -2.0
        return 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))

    def x0_and_noise(self, x_t, t, prediction):
        """From v = eps - x0 and x_t = (1 - s) x0 + s eps: x0 = x_t - s v, eps = x_t + (1 - s) v."""
        s, v, x_t = self.sigma(t, x_t), prediction.float(), x_t.float()
        return x_t - s * v, x_t + (1 - s) * v

    def probe_t(self, n: int) -> torch.Tensor:
        """The centres of n equal slices of (0, 1) in s, unshifted: a fixed set of noise levels at any resolution."""
        return torch.tensor([(i + 0.5) / n * self.num_train_timesteps for i in range(n)])

    def sampling_t(self, steps: int, latent_shape: torch.Size) -> torch.Tensor:
        """s = 1, 1 - 1/steps, ..., 1/steps, shifted as the folder's sampler shifts them (FlowMatchEuler's spacing)."""
        u = torch.tensor([1 - i / steps for i in range(steps)])
        return shifted(u, self.alpha(latent_shape)) * self.num_train_timesteps

    def sampler(self, name: str, base_config, flag: str = "scheduler"):
        return flow_sampler(name, base_config, flag)


def flow_sampler(name: str, base_config, flag: str = "scheduler"):
    """The rectified-flow sampler called `name`; a DDPM sampler's name is refused, naming `flag`."""
    if name not in FLOW_SAMPLERS:
        raise DreamBoothError(f"{flag}={name} is not a sampler for a rectified-flow model (its scheduler is "
                              f"{base_config.get('_class_name', 'a flow-matching scheduler')}): use {flag}="
                              f"{' or '.join(FLOW_SAMPLERS)} ({', '.join(c.__name__ for c in FLOW_SAMPLERS.values())})")
    return FLOW_SAMPLERS[name].from_config(base_config)


def check_sampler(schedule: NoiseSchedule, name: str, flag: str, where: str) -> None:
    """Refuse, before any weight loads, a sampler name the model's schedule cannot render with."""
    if name not in schedule.samplers:
        raise DreamBoothError(f"{flag}={name} is not a sampler for {where}, which trains with a {schedule.kind} schedule: "
                              f"use {flag}={' or '.join(schedule.samplers)}")


def is_flow(config) -> bool:
    """Whether a scheduler config is a rectified-flow one: diffusers names those classes FlowMatch* (a config read
    from a folder records its class); one built in memory records none, and every DDPM sampler has a beta schedule."""
    name = config.get("_class_name")
    return name.startswith("FlowMatch") if name else "beta_schedule" not in config


def sampler_for(base_config, name: str, flag: str = "scheduler"):
    """The sampler called `name` for a pipeline loaded outside a training run (class images, `dreambooth sample`):
    the schedule kind its own scheduler config records decides which names are valid."""
    return (flow_sampler if is_flow(base_config) else ddpm_sampler)(name, base_config, flag)
