"""The DreamBooth recipe: `train(cfg)` reads top to bottom - setup, loop, export.

    1. check the settings, load the model, read and validate every photo (fail before any work)
    2. generate missing class images (prior preservation)
    3. choose what trains (full / LoRA, text encoder), memory options, optimizer, LR schedule
    4. cache latents / text embeddings when nothing about them changes during training
    5. resume from the latest checkpoint if asked
    6. the loop: per optimizer step, `gradient_accumulation_steps` micro-batches of subject
       (+ class) examples -> per-sample losses -> weighted sum -> backward; clip, step, zero
    7. periodic checkpoints and validation images; final export and model card

Multi-GPU, multi-node, DeepSpeed and FSDP come from accelerate (`accelerate launch -m
dreambooth.cli train ...`); nothing here is device- or topology-specific.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import objective
from .config import TrainConfig
from .data.class_images import ClassImageSettings, ensure_class_images, model_fingerprint
from .data.dataset import DreamBoothData, class_examples, subject_examples
from .compat import check_environment
from .errors import DreamBoothError
from .export import export, update_model_card
from .files import finish_swap
from .models.load import check_resolution, detect_family
from .models.memory import apply_memory_options
from .models.trainable import freeze_text_encoder, setup_trainable
from .optim import OptimizerInBackward, build_lr_scheduler, build_optimizer
from .timing import PhaseTimer
from .validation import Logger, validate

log = logging.getLogger("dreambooth")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int  # optimizer steps completed, in total
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, for the steps this call ran
    step_seconds: dict[int, float] = field(default_factory=dict)  # step -> wall time of the step (excl. saves)
    phase_seconds: dict[str, list[float]] = field(default_factory=dict)  # data/forward/backward/optimizer per step
    seconds: float = 0.0
    trainable_parameters: int = 0


def train(cfg: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    start_time = time.time()
    cfg.validate()
    check_environment(cfg)  # installed packages can do what the settings ask
    family = detect_family(cfg.model.path, cfg.model.family)
    check_resolution(cfg.data.resolution, cfg.model.path, family)
    out = Path(cfg.train.output_dir)
    finish_swap(out)  # complete an export that a kill interrupted
    # accelerate keeps its settings in a process-wide singleton; clear them (not the process group)
    # so that a second train() in one process (a UI, a sweep, the tests) can use other settings.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.memory.mixed_precision,
                              gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate gives DeepSpeed exactly one model and lets it own precision and the optimizer step
        clash = [name for name, on in (("text_encoder.train=true", cfg.text_encoder.train),
                                       ("memory.weights_dtype=bf16", cfg.memory.weights_dtype == "bf16"),
                                       ("optim.fused_backward=true", cfg.optim.fused_backward)) if on]
        if clash:
            raise DreamBoothError(f"DeepSpeed (accelerate config) cannot run with {', '.join(clash)}: accelerate prepares "
                                  "one model for DeepSpeed, which also owns precision and the optimizer step. Turn them "
                                  "off (see configs/accelerate/zero2_offload.yaml), or drop DeepSpeed and use --preset low-memory")
    if cfg.optim.fused_backward and accelerator.num_processes > 1:
        raise DreamBoothError("optim.fused_backward=true steps each parameter before the gradients are averaged "
                              f"across processes; it runs in one process only (this launch has {accelerator.num_processes})")

    # 1. settings, model and photos - every input error surfaces here, before any training
    comps = family.load(Path(cfg.model.path))
    concepts = cfg.resolved_concepts()
    subject = subject_examples(concepts, cfg.data)
    fingerprint = model_fingerprint(cfg.model.path)
    resume_from = ckpt.latest_checkpoint(out) if cfg.train.resume else None
    if cfg.train.resume and resume_from is None:
        raise DreamBoothError(f"train.resume is set but {ckpt.checkpoints_root(out)} has no checkpoint; "
                              "drop --train.resume to start a new run")
    start_step = ckpt.check_resume_compatible(resume_from, cfg, fingerprint) if resume_from else 0
    if not cfg.train.resume and ckpt.latest_checkpoint(out) is not None:
        raise DreamBoothError(f"{out} already holds checkpoints of an earlier run: add --train.resume to continue it, "
                              "or choose another train.output_dir")

    # 2. prior preservation: class images made by the base model itself
    klass = []
    if cfg.prior.enabled:
        with accelerator.main_process_first():  # one process generates; the others then find and reuse the images
            files = [ensure_class_images(cfg.model.path, c.class_dir, class_image_settings(cfg, c),
                                         user_supplied=c.class_images_user_supplied,
                                         device=accelerator.device,
                                         dtype=weight_dtype if accelerator.device.type == "cuda" else torch.float32)
                     for c in concepts]
        klass = class_examples(files, concepts, cfg.data)
    data = DreamBoothData(subject, klass, cfg.data, cfg.train.seed)

    # 3. what trains, memory options, optimizer
    torch.manual_seed(cfg.train.seed)  # adapter init and dropout draw from the global RNG
    trainable = setup_trainable(comps, cfg)
    apply_memory_options(comps, cfg)
    groups = [{"params": list(trainable.unet.values()), "lr": cfg.optim.lr}]
    if trainable.text_encoder:
        groups.append({"params": list(trainable.text_encoder.values()), "lr": cfg.text_encoder.lr or cfg.optim.lr})
    optimizer = build_optimizer(groups, cfg)  # with optim.fused_backward it steps inside backward()
    lr_scheduler = build_lr_scheduler(optimizer, cfg)
    in_backward = optimizer if isinstance(optimizer, OptimizerInBackward) else None
    train_te = bool(trainable.text_encoder)
    _place(comps.vae, accelerator.device, weight_dtype)
    if train_te:
        comps.unet, comps.text_encoder, optimizer = accelerator.prepare(comps.unet, comps.text_encoder, optimizer)
    else:
        _place(comps.text_encoder, accelerator.device, weight_dtype)
        comps.unet, optimizer = accelerator.prepare(comps.unet, optimizer)
    models = [comps.unet] + ([comps.text_encoder] if train_te else [])

    # 4. caches: encode each image / prompt once when the result cannot change
    latent_cache = _encode_images(comps, data, accelerator) if cfg.cache_latents else None
    text_cache = _encode_prompts(comps, data) if cfg.cache_text_embeddings else None

    # 5. resume
    generator = torch.Generator().manual_seed(cfg.train.seed)  # noise, timesteps, latent samples
    if resume_from is not None:
        ckpt.load_checkpoint(resume_from, trainable, optimizer, lr_scheduler, generator)
        log.info("resumed from %s at step %d", resume_from, start_step)
    if train_te and cfg.text_encoder.stop_step is not None and start_step >= cfg.text_encoder.stop_step:
        freeze_text_encoder(comps, trainable)

    # 6. the loop
    logger = Logger(out / "logs", enabled=accelerator.is_main_process, resumed_at=start_step if resume_from else None)
    result = TrainResult(out, start_step, trainable_parameters=trainable.count())
    timer = PhaseTimer(enabled=True, synchronize=cfg.train.time_phases)
    result.phase_seconds = timer.seconds
    accum, world, rank = cfg.train.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    for m in models:
        m.train()
    bar = tqdm(range(start_step, cfg.train.max_steps), initial=start_step, total=cfg.train.max_steps,
               desc="training", disable=not accelerator.is_local_main_process)
    for step in bar:  # `step` optimizer steps are done; this iteration makes step + 1
        step_start = time.perf_counter()
        # Noise, timesteps and latent samples of this step and process come from a generator seeded by
        # (seed, step, rank): processes never share noise, and a resume needs only the step number.
        generator.manual_seed(cfg.train.seed * 1_000_003 + step * world + rank)
        if train_te and cfg.text_encoder.stop_step is not None and step == cfg.text_encoder.stop_step:
            freeze_text_encoder(comps, trainable)
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            # Stream positions of this process's micro-batch: (step, micro, rank) -> disjoint ranges.
            first = ((step * accum + micro) * world + rank) * cfg.train.batch_size
            with accelerator.accumulate(*models):
                with timer.phase("data"):
                    batch = data.batch(first, cfg.train.batch_size, with_pixels=latent_cache is None)
                with timer.phase("forward"), accelerator.autocast():
                    latents = _latents(comps, batch, latent_cache, generator, accelerator)  # (N, 4, H/8, W/8)
                    conditioning = _conditioning(comps, batch, text_cache, accelerator)
                    per_sample = objective.diffusion_loss(comps.unet, comps.noise_scheduler, latents, conditioning, generator,
                                                          cfg.objective.snr_gamma, cfg.objective.offset_noise)  # (N,)
                    loss = objective.combine(per_sample, batch.is_prior, cfg.prior.loss_weight)
                with timer.phase("backward"):
                    accelerator.backward(loss)
                with timer.phase("optimizer"):
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm is not None:
                        accelerator.clip_grad_norm_([p for p in trainable.named().values() if p.requires_grad],
                                                    cfg.optim.max_grad_norm)
                    optimizer.step()  # optim.fused_backward: already done, parameter by parameter
                    optimizer.zero_grad(set_to_none=True)  # frees gradient memory between steps
            step_loss += loss.detach() / accum
        timer.end_step()
        lr_scheduler.step()
        done = step + 1
        step_loss = step_loss.item()  # one host sync per step, not per micro-batch
        result.losses[done] = step_loss
        result.step_seconds[done] = time.perf_counter() - step_start
        result.steps = done
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if done % cfg.train.log_every_n_steps == 0:
            logger.scalars(done, loss=step_loss, lr=lr_scheduler.get_last_lr()[0])

        # 7. checkpoints and validation
        # The last step is saved too, so a finished run can be extended (raise max_steps, resume).
        if cfg.checkpoint.every_n_steps and (done % cfg.checkpoint.every_n_steps == 0 or done == cfg.train.max_steps):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                ckpt.save_checkpoint(out, done, trainable, optimizer, lr_scheduler, generator, cfg, fingerprint)
        if cfg.validation.every_n_steps and done % cfg.validation.every_n_steps == 0 and done < cfg.train.max_steps:
            _validate(comps, cfg, accelerator, models, logger, done)
    bar.close()
    if in_backward is not None:
        in_backward.remove_hooks()  # the trained model leaves train() as a plain module

    accelerator.wait_for_everyone()
    comps.unet = accelerator.unwrap_model(comps.unet)
    comps.text_encoder = accelerator.unwrap_model(comps.text_encoder)
    if accelerator.is_main_process:
        # The model is written before the final validation, so a failure there cannot lose it.
        export(comps, cfg, out, trainable, None, result)
        if cfg.validation.prompts:
            with accelerator.autocast():
                grid = validate(comps, cfg.validation, cfg.data.resolution, out / "samples", result.steps, logger)
            update_model_card(cfg, out, grid, result)
    logger.close()
    result.seconds = time.time() - start_time
    accelerator.end_training()
    return result


# ---- helpers: small, single-purpose pieces of the loop -------------------------------------

def _place(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when the dtype changes (a no-op cast makes diffusers warn)."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)

def class_image_settings(cfg: TrainConfig, concept) -> ClassImageSettings:
    p = cfg.prior
    return ClassImageSettings(prompt=concept.class_prompt, num_images=p.num_class_images, resolution=cfg.data.resolution,
                              scheduler=p.scheduler, num_inference_steps=p.num_inference_steps,
                              guidance_scale=p.guidance_scale, negative_prompt=p.negative_prompt, seed=p.seed,
                              batch_size=p.batch_size)


@torch.no_grad()
def _encode_images(comps, data: DreamBoothData, accelerator) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """(kind, index) -> VAE posterior (mean, std), each (4, H/8, W/8), for every image, once."""
    cache = {}
    keys = [("subject", i) for i in range(len(data.subject))] + [("class", i) for i in range(len(data.klass))]
    for kind, i in tqdm(keys, desc="caching latents", disable=not accelerator.is_local_main_process, leave=False):
        mean, std = comps.family.encode_images(comps, data.pixels(kind, i)[None])
        cache[(kind, i)] = (mean[0], std[0])
    return cache


@torch.no_grad()
def _encode_prompts(comps, data: DreamBoothData) -> dict[str, dict[str, torch.Tensor]]:
    """prompt -> UNet conditioning for every distinct prompt, once (text encoder frozen)."""
    prompts = sorted({e.prompt for e in data.subject + data.klass})
    cache = {}
    for prompt in prompts:
        cond = comps.family.encode_text(comps, comps.family.tokenize(comps, [prompt]))
        cache[prompt] = {k: v[0] for k, v in cond.items()}
    return cache


def _latents(comps, batch, latent_cache, generator, accelerator) -> torch.Tensor:
    if latent_cache is not None:
        mean = torch.stack([latent_cache[k][0] for k in batch.indices])
        std = torch.stack([latent_cache[k][1] for k in batch.indices])
    else:
        with torch.no_grad():
            mean, std = comps.family.encode_images(comps, batch.pixels.to(accelerator.device))
    return comps.family.latents_from(comps, mean.float(), std.float(), generator)


def _conditioning(comps, batch, text_cache, accelerator) -> dict[str, torch.Tensor]:
    prompts = [e.prompt for e in batch.examples]
    if text_cache is not None:
        return {k: torch.stack([text_cache[p][k] for p in prompts]) for k in text_cache[prompts[0]]}
    return comps.family.encode_text(comps, comps.family.tokenize(comps, prompts).to(accelerator.device))


def _validate(comps, cfg, accelerator, models, logger, step) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet, te = comps.unet, comps.text_encoder
        comps.unet, comps.text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(te)
        with accelerator.autocast():
            validate(comps, cfg.validation, cfg.data.resolution, Path(cfg.train.output_dir) / "samples", step, logger)
        comps.unet, comps.text_encoder = unet, te
        for m in models:
            m.train()


def summary(result: TrainResult) -> str:
    losses = list(result.losses.values())
    last = f", final loss {losses[-1]:.4f}" if losses else ""
    return (f"trained {result.steps} steps ({result.trainable_parameters:,} trainable parameters) in "
            f"{result.seconds:.1f} s{last}; model written to {result.output_dir}")

