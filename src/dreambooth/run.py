"""`setup_run`: everything the training loop touches, built in one place, in one order.

The order matters for exact resume and for golden losses: the global RNG is seeded before
anything that draws from it (adapter init, dropout), the frozen base is copied before anything
trains, and the drift probe measures the base before a resume loads trained weights.

    accelerator -> weights -> prior examples -> data -> frozen base -> what trains -> optimizer
    -> placement -> encoders' caches -> drift probe, judge -> resume

Multi-GPU, multi-node, DeepSpeed and FSDP come from accelerate (`accelerate launch -m
dreambooth.cli train ...`); nothing here is device- or topology-specific.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .data.dataset import DreamBoothData, Positions
from .data.prior import prior_examples
from .doctor import log_short_report
from .ema import WeightAverage
from .errors import DreamBoothError
from .inputs import Latents, Texts
from .interop.embeddings import check_identifiers
from .models.family import Components
from .models.frozen_base import FrozenBase
from .models.memory import apply_memory_options
from .models.trainable import FreezeSchedule, Trainable, setup_trainable, trained_module_names
from .monitor import DriftMonitor, probe_class_images
from .optim import OptimizerInBackward, build_lr_scheduler, build_optimizer
from .plan import Plan
from .timing import PhaseTimer
from .validation import Logger

log = logging.getLogger("dreambooth")

# train.select=best's judge, when a better one than the drift probe exists (the miniature world passes
# its attribute classifier): called once with the base's components, before any update, it returns the
# scorer called at each checkpoint, comps -> (score, metrics), lower scores better.
Judge = Callable[[Components], Callable[[Components], tuple[float, dict]]]


@dataclass
class Run:
    """What the loop touches. `models` are the trained modules as accelerate wrapped them."""

    cfg: TrainConfig
    plan: Plan
    accelerator: Any
    comps: Components
    data: DreamBoothData
    trainable: Trainable
    freeze: FreezeSchedule
    optimizer: Any
    lr_scheduler: Any
    ema: WeightAverage
    latents: Latents
    texts: Texts
    base: FrozenBase | None  # the frozen base whose predictions distilled samples learn (prior.source=model, kp)
    monitor: DriftMonitor | None
    scorer: Callable[[Components], tuple[float, dict]] | None  # the judge's, for train.select=best
    generator: torch.Generator  # noise, timesteps, latent samples; reseeded per step
    logger: Logger
    timer: PhaseTimer
    models: list[torch.nn.Module] = field(default_factory=list)
    in_backward: OptimizerInBackward | None = None  # optim.fused_backward: the optimizer, whose hooks finish() removes

    @property
    def accum(self) -> int:
        return self.cfg.train.gradient_accumulation_steps


def setup_run(cfg: TrainConfig, plan: Plan, judge: Judge | None = None) -> Run:
    accelerator, weight_dtype = _accelerator(cfg)
    family, out = plan.family, plan.out
    comps = family.load(plan.model_dir, cfg.model.vae_path)
    check_identifiers(cfg, comps)  # a LoRA saves a trained identifier as a textual-inversion file: it must load back
    if accelerator.is_main_process:  # `dreambooth doctor`'s checks on the decoded photos, as warnings
        log_short_report(plan.subject, plan.concepts, cfg.data, plan.buckets, check_identifier=family.trains_with_identifier)
    klass = prior_examples(cfg, plan.concepts, plan.subject, plan.buckets, plan.model_dir, accelerator, weight_dtype)
    probe_images = []  # without class images, the drift probe has the base draw its own few
    if cfg.monitor.every_n_steps and not (cfg.prior.enabled and cfg.prior.source == "images"):
        with accelerator.main_process_first():
            probe_images = probe_class_images(cfg, plan.concepts, plan.model_dir, accelerator.device, torch.float32)
    world, rank = accelerator.num_processes, accelerator.process_index
    data = DreamBoothData(plan.subject, klass, cfg.data, cfg.train.seed,
                          Positions(cfg.train.batch_size, cfg.train.gradient_accumulation_steps, world, rank),
                          buckets=plan.buckets, preserve_prompts=cfg.preservation_prompts())

    torch.manual_seed(cfg.train.seed)  # adapter init and dropout draw from the global RNG
    text_encoders = cfg.text_encoders()
    # the frozen base for distilled targets, taken before anything trains (LoRA: the same modules, adapters off)
    base = (FrozenBase(comps, trained_module_names(comps, text_encoders), cfg.train.method == "lora",
                       cfg.prior.source == "model", cfg.prior.base_sample_steps) if cfg.distills else None)
    trainable = setup_trainable(comps, cfg.train.method, cfg.lora, text_encoders, cfg.memory.weights_dtype,
                                identifiers=tuple(c.resolved_identifier for c in plan.concepts))
    apply_memory_options(comps, cfg.memory, trainable.modules)
    optimizer = build_optimizer(trainable.param_groups(cfg.optim.lr, text_encoders), cfg.optim,
                                cfg.memory.weights_dtype)  # with optim.fused_backward it steps inside backward()
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    in_backward = optimizer if isinstance(optimizer, OptimizerInBackward) else None  # before accelerate wraps it
    for name, module in comps.modules.items():  # frozen parts: to the device, in the autocast dtype
        if name not in trainable.modules:
            place(module, accelerator.device, torch.float32 if name in comps.keep_fp32 else weight_dtype)
    for module in (base.copies().values() if base is not None else ()):
        place(module, accelerator.device, weight_dtype)
    *models, optimizer = accelerator.prepare(*(comps.modules[n] for n in trainable.modules), optimizer)
    comps.modules.update(zip(trainable.modules, models))  # the trained modules, as accelerate wraps them
    ema = WeightAverage(trainable, cfg.ema)  # fp32, beside the weights; every call a no-op unless ema.enabled
    freeze = FreezeSchedule({name: te.stop_step for name, te in text_encoders.items()
                             if name in trainable.modules and te.stop_step is not None},
                            family.denoiser, cfg.train.denoiser_start_step)

    # encode each image / prompt once when the result cannot change
    latents = Latents(comps, data, cfg.cache_latents, accelerator.device, progress=accelerator.is_local_main_process)
    texts = Texts(comps, data, cfg.cache_text_embeddings, [*cfg.validation.prompts, cfg.validation.negative_prompt or ""],
                  out / "cache" / "text-embeddings.safetensors" if accelerator.is_main_process else None,
                  plan.fingerprint, accelerator.device)
    if base is not None:
        base.encode_prompts([e.prompt for e in data.subject + data.klass] + data.preserve_prompts)
    # the drift probe and the judge measure the base, before a resume loads any trained weights
    monitor = DriftMonitor(comps, data, cfg.monitor, probe_images, cfg.trains_text_encoder) if cfg.monitor.every_n_steps else None
    scorer = judge(comps) if judge is not None and cfg.train.select == "best" else None
    if cfg.memory.offload_text_encoders:  # frozen and no longer needed on the device: texts holds their output
        for name in set(family.text_encoders) - set(trainable.modules):
            comps.modules[name].to("cpu")

    generator = torch.Generator().manual_seed(cfg.train.seed)
    if plan.resume_from is not None:
        ckpt.load_checkpoint(plan.resume_from, trainable, optimizer, lr_scheduler, generator, ema)
        log.info("resumed from %s at step %d", plan.resume_from, plan.start_step)
    logger = Logger(out / "logs", enabled=accelerator.is_main_process,
                    resumed_at=plan.start_step if plan.resume_from else None)
    if monitor is not None and plan.resume_from is None:
        logger.scalars(0, **monitor.base_metrics())
    for m in models:
        m.train()
    return Run(cfg, plan, accelerator, comps, data, trainable, freeze, optimizer, lr_scheduler, ema, latents, texts,
               base, monitor, scorer, generator, logger, PhaseTimer(synchronize=cfg.train.time_phases), models, in_backward)


def _accelerator(cfg: TrainConfig):
    """accelerate's Accelerator for these settings and the frozen parts' dtype; refuses what a launch cannot run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    # accelerate keeps its settings in a process-wide singleton; clear them (not the process group)
    # so that a second train() in one process (a UI, a sweep, the tests) can use other settings.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.memory.mixed_precision,
                              gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate gives DeepSpeed exactly one model and lets it own precision and the optimizer step
        clash = [f"{name}.train=true" for name, te in cfg.text_encoders().items() if te.train]
        clash += [name for name, on in (("memory.weights_dtype=bf16", cfg.memory.weights_dtype == "bf16"),
                                        ("optim.fused_backward=true", cfg.optim.fused_backward)) if on]
        if clash:
            raise DreamBoothError(f"DeepSpeed (accelerate config) cannot run with {', '.join(clash)}: accelerate prepares "
                                  "one model for DeepSpeed, which also owns precision and the optimizer step. Turn them "
                                  "off (see configs/accelerate/zero2_offload.yaml), or drop DeepSpeed and use --preset low-memory")
    if cfg.train.denoiser_start_step and accelerator.num_processes > 1:
        raise DreamBoothError("train.denoiser_start_step freezes the denoiser for the first steps, and distributed "
                              "data parallelism expects a gradient for every weight it wrapped at every step; it runs "
                              f"in one process only (this launch has {accelerator.num_processes}); set "
                              "--train.denoiser_start_step 0 (the object preset sets 100) or launch one process")
    if cfg.optim.fused_backward and accelerator.num_processes > 1:
        raise DreamBoothError("optim.fused_backward=true steps each parameter before the gradients are averaged "
                              f"across processes; it runs in one process only (this launch has {accelerator.num_processes})")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return accelerator, dtype


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when the dtype changes (a no-op cast makes diffusers warn)."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)

