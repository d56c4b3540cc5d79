"""The DreamBooth recipe: `train(cfg)` reads top to bottom - setup, loop, export.

    1. check the settings, load the model, read and validate every photo (fail before any work)
    2. generate missing class images (prior preservation with prior.source=images)
    3. choose what trains (full / LoRA, text encoder), memory options, optimizer, LR schedule,
       the weights' moving average (ema.enabled: what validation and export use)
    4. cache latents / text embeddings when nothing about them changes during training
    5. resume from the latest checkpoint if asked
    6. the loop: per optimizer step, `gradient_accumulation_steps` micro-batches of subject
       (+ class) examples -> per-sample losses -> weighted sum -> backward; clip, step, zero
    7. periodic checkpoints, drift probe and validation images; final export (the last or the best
       checkpoint, `train.select`) and model card

Multi-GPU, multi-node, DeepSpeed and FSDP come from accelerate (`accelerate launch -m
dreambooth.cli train ...`); nothing here is device- or topology-specific.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import objective
from .compat import check_environment
from .config import TrainConfig, to_dict, yaml_text
from .data.buckets import buckets_for, class_image_counts, nearest_bucket
from .data.class_images import ClassImageSettings, ensure_class_images, model_fingerprint
from .data.dataset import DreamBoothData, Positions, class_examples, class_prompt_twins, subject_examples
from .doctor import log_short_report
from .ema import WeightAverage
from .errors import DreamBoothError
from .export import export, model_card, update_model_card
from .files import finish_swap
from .inputs import Latents, Texts
from .interop.embeddings import check_identifiers
from .monitor import DriftMonitor, checkpoint_scorer, probe_class_images, score
from .models.load import check_resolution, check_settings, detect_family, model_folder
from .models.memory import apply_memory_options
from .models.frozen_base import FrozenBase
from .models.trainable import setup_trainable, trained_module_names
from .optim import OptimizerInBackward, build_lr_scheduler, build_optimizer
from .timing import PhaseTimer
from .validation import Logger, validate

log = logging.getLogger("dreambooth")

# A graceful stop: whoever wants a running job to stop (the web UI's Stop button, or `touch` by hand)
# creates this file in the output folder. The loop looks for it once per optimizer step, writes a
# checkpoint and returns without exporting; `train.resume` continues from that checkpoint.
STOP_FILE = "stop-requested"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int  # optimizer steps completed, in total
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, for the steps this call ran
    step_seconds: dict[int, float] = field(default_factory=dict)  # step -> wall time of the step (excl. saves)
    phase_seconds: dict[str, list[float]] = field(default_factory=dict)  # data/forward/backward/optimizer per step
    seconds: float = 0.0
    trainable_parameters: int = 0
    stopped: bool = False  # stopped early on request (STOP_FILE): checkpointed, not exported
    exported_step: int | None = None  # the step whose weights were exported (train.select=best may pick an earlier one)


def train(cfg: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    start_time = time.time()
    cfg.validate()
    check_environment(cfg)  # installed packages can do what the settings ask
    model_dir = model_folder(cfg.model)  # a single-file checkpoint is converted (once) here
    family = detect_family(model_dir, cfg.model.family)
    check_settings(cfg, family, model_dir)
    check_resolution(cfg.data.resolution, model_dir, family)
    buckets = buckets_for(cfg.data, family, family.latent_factor(model_dir))  # None: square crops
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

    # 1. settings, model and photos - every input error surfaces here, before any training
    comps = family.load(model_dir, cfg.model.vae_path)
    concepts = cfg.resolved_concepts()
    check_identifiers(cfg, comps)  # a LoRA saves a trained identifier as a textual-inversion file: it must load back
    subject = subject_examples(concepts, cfg.data, without_identifier=not family.trains_with_identifier)
    if accelerator.is_main_process:  # `dreambooth doctor`'s checks on the decoded photos, as warnings
        log_short_report(subject, concepts, cfg.data, buckets, check_identifier=family.trains_with_identifier)
    fingerprint = model_fingerprint(model_dir)
    resume_from = ckpt.latest_checkpoint(out) if cfg.train.resume else None
    if cfg.train.resume and resume_from is None:
        raise DreamBoothError(f"train.resume is set but {ckpt.checkpoints_root(out)} has no checkpoint; "
                              "drop --train.resume to start a new run")
    start_step = ckpt.check_resume_compatible(resume_from, cfg, fingerprint) if resume_from else 0
    if not cfg.train.resume and ckpt.latest_checkpoint(out) is not None:
        raise DreamBoothError(f"{out} already holds checkpoints of an earlier run: add --train.resume to continue it, "
                              "or choose another train.output_dir")

    # 2. prior preservation: class images made by the base model itself, or (prior.source=model) a
    # class-prompt sample beside each subject photo, which the frozen base draws and predicts in the loop
    klass = []
    if cfg.prior.enabled and cfg.prior.source == "model":
        klass = class_prompt_twins(subject, concepts)
    elif cfg.prior.enabled:
        with accelerator.main_process_first():  # one process generates; the others then find and reuse the images
            files = [ensure_concept_class_images(cfg, c, subject, buckets, model_dir, device=accelerator.device,
                                                 dtype=weight_dtype if accelerator.device.type == "cuda" else torch.float32)
                     for c in concepts]
        klass = class_examples(files, concepts, cfg.data)
    probe_images = []  # without class images, the drift probe has the base draw its own few
    if cfg.monitor.every_n_steps and not (cfg.prior.enabled and cfg.prior.source == "images"):
        with accelerator.main_process_first():
            probe_images = probe_class_images(cfg, concepts, model_dir, accelerator.device, torch.float32)
    accum, world, rank = cfg.train.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    data = DreamBoothData(subject, klass, cfg.data, cfg.train.seed, Positions(cfg.train.batch_size, accum, world, rank),
                          buckets=buckets, preserve_prompts=cfg.preservation_prompts())

    # 3. what trains, memory options, optimizer
    torch.manual_seed(cfg.train.seed)  # adapter init and dropout draw from the global RNG
    text_encoders = cfg.text_encoders()
    # the frozen base for distilled targets, taken before anything trains (LoRA: the same modules, adapters off)
    base = (FrozenBase(comps, trained_module_names(comps, text_encoders), cfg.train.method == "lora")
            if cfg.distills else None)
    trainable = setup_trainable(comps, cfg.train.method, cfg.lora, text_encoders, cfg.memory.weights_dtype,
                                identifiers=tuple(c.resolved_identifier for c in concepts))
    apply_memory_options(comps, cfg.memory, trainable.modules)
    optimizer = build_optimizer(trainable.param_groups(cfg.optim.lr, text_encoders), cfg.optim,
                                cfg.memory.weights_dtype)  # with optim.fused_backward it steps inside backward()
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    in_backward = optimizer if isinstance(optimizer, OptimizerInBackward) else None
    for name, module in comps.modules.items():  # frozen parts: to the device, in the autocast dtype
        if name not in trainable.modules:
            _place(module, accelerator.device, torch.float32 if name in comps.keep_fp32 else weight_dtype)
    for module in (base.copies().values() if base is not None else ()):
        _place(module, accelerator.device, weight_dtype)
    *models, optimizer = accelerator.prepare(*(comps.modules[n] for n in trainable.modules), optimizer)
    comps.modules.update(zip(trainable.modules, models))  # the trained modules, as accelerate wraps them
    ema = WeightAverage(trainable, cfg.ema)  # fp32, beside the weights; every call a no-op unless ema.enabled
    stop_steps = {name: te.stop_step for name, te in text_encoders.items() if name in trainable.modules and te.stop_step is not None}

    # 4. inputs: encode each image / prompt once when the result cannot change
    latents = Latents(comps, data, cfg.cache_latents, accelerator.device, progress=accelerator.is_local_main_process)
    texts = Texts(comps, data, cfg.cache_text_embeddings, [*cfg.validation.prompts, cfg.validation.negative_prompt or ""],
                  out / "cache" / "text-embeddings.safetensors" if accelerator.is_main_process else None, fingerprint,
                  accelerator.device)
    if base is not None:
        base.encode_prompts([e.prompt for e in data.subject + data.klass] + data.preserve_prompts)
    # the drift probe: built, and the base's losses measured, before a resume loads any trained weights
    monitor = DriftMonitor(comps, data, cfg.monitor, probe_images, cfg.trains_text_encoder) if cfg.monitor.every_n_steps else None
    scorer = checkpoint_scorer(cfg, comps, model_dir)  # train.select=best in the miniature world: the classifier
    if cfg.memory.offload_text_encoders:  # frozen and no longer needed on the device: texts holds their output
        for name in set(family.text_encoders) - set(trainable.modules):
            comps.modules[name].to("cpu")

    # 5. resume
    generator = torch.Generator().manual_seed(cfg.train.seed)  # noise, timesteps, latent samples
    if resume_from is not None:
        ckpt.load_checkpoint(resume_from, trainable, optimizer, lr_scheduler, generator, ema)
        log.info("resumed from %s at step %d", resume_from, start_step)
    for name, stop in stop_steps.items():
        if start_step >= stop:
            trainable.freeze(name)
    pivot = cfg.train.denoiser_start_step  # pivotal tuning: the subject goes into the embedding first
    if start_step < pivot:
        trainable.freeze(family.denoiser)

    # 6. the loop
    logger = Logger(out / "logs", enabled=accelerator.is_main_process, resumed_at=start_step if resume_from else None)
    result = TrainResult(out, start_step, trainable_parameters=trainable.count())
    if monitor is not None and resume_from is None:
        logger.scalars(0, **monitor.base_metrics())
    timer = PhaseTimer(synchronize=cfg.train.time_phases)
    result.phase_seconds = timer.seconds
    for m in models:
        m.train()
    bar = tqdm(range(start_step, cfg.train.max_steps), initial=start_step, total=cfg.train.max_steps,
               desc="training", disable=not accelerator.is_local_main_process)
    for step in bar:  # `step` optimizer steps are done; this iteration makes step + 1
        step_start = time.perf_counter()
        # Noise, timesteps and latent samples of this step and process come from a generator seeded by
        # (seed, step, rank): processes never share noise, and a resume needs only the step number.
        generator.manual_seed(cfg.train.seed * 1_000_003 + step * world + rank)
        for name, stop in stop_steps.items():
            if step == stop:
                trainable.freeze(name)
        if step == pivot and pivot:
            trainable.unfreeze(family.denoiser)
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            with accelerator.accumulate(*models):
                with timer.phase("data"):
                    batch = data.micro_batch(step, micro, with_pixels=latents.needs_pixels)
                with timer.phase("forward"), accelerator.autocast():
                    x0 = latents(batch, generator)  # (N, C, H/f, W/f)
                    before_cond = generator.get_state() if base is not None else None
                    cond = family.conditioning(comps, texts(batch), batch, x0, generator)  # the denoiser's kwargs
                    teacher = base.predictor(batch, x0, cond, before_cond) if base is not None else None
                    distilled = objective.distilled_samples(batch.is_prior, batch.is_preserve, cfg.prior.source == "model")
                    if distilled is not None:  # their clean inputs: the base's own samples for their prompts
                        x0 = x0.clone()
                        x0[distilled] = objective.base_samples(teacher, comps.noise_scheduler, x0.shape, distilled, generator,
                                                               cfg.prior.base_sample_steps, x0.device).to(x0.dtype)
                    per_sample = objective.diffusion_loss(lambda noisy, t: family.predict(comps, noisy, t, cond),
                                                          comps.noise_scheduler, x0, generator, cfg.objective.snr_gamma,
                                                          cfg.objective.offset_noise, teacher, distilled)  # (N,)
                    loss = objective.combine(per_sample, batch.is_prior, cfg.prior.loss_weight, batch.is_preserve,
                                             cfg.prior.preserve_weight)
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
        ema.update()
        done = step + 1
        step_loss = step_loss.item()  # one host sync per step, not per micro-batch
        result.losses[done] = step_loss
        result.step_seconds[done] = time.perf_counter() - step_start
        result.steps = done
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if done % cfg.train.log_every_n_steps == 0:
            logger.scalars(done, loss=step_loss, lr=lr_scheduler.get_last_lr()[0])

        # 7. checkpoints, drift probe and validation
        # The last step is saved too, so a finished run can be extended (raise max_steps, resume).
        saving = cfg.checkpoint.every_n_steps and (done % cfg.checkpoint.every_n_steps == 0 or done == cfg.train.max_steps)
        probe = None
        if monitor is not None and (saving or done % cfg.monitor.every_n_steps == 0):
            with accelerator.autocast():
                probe = monitor.measure()
            logger.scalars(done, **probe)
        if saving:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                best_score, metrics = _score(scorer, probe, cfg, comps, trainable, accelerator)
                ckpt.save_checkpoint(out, done, trainable, optimizer, lr_scheduler, generator, to_dict(cfg),
                                     cfg.checkpoint.keep, fingerprint, ema, metrics=metrics, score=best_score)
        if cfg.validation.every_n_steps and done % cfg.validation.every_n_steps == 0 and done < cfg.train.max_steps:
            _validate(comps, trainable, ema, cfg, data, texts, accelerator, logger, done)
        if done < cfg.train.max_steps and (out / STOP_FILE).exists():
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if ckpt.latest_checkpoint(out) != ckpt.checkpoints_root(out) / f"step-{done:06d}":  # not saved above
                    ckpt.save_checkpoint(out, done, trainable, optimizer, lr_scheduler, generator, to_dict(cfg),
                                         cfg.checkpoint.keep, fingerprint, ema)
                (out / STOP_FILE).unlink(missing_ok=True)
            result.stopped = True
            log.info("stop requested: checkpoint written at step %d; continue with train.resume", done)
            break
    bar.close()
    if in_backward is not None:
        in_backward.remove_hooks()  # the trained model leaves train() as a plain module

    if result.stopped:
        logger.close()
        result.seconds = time.time() - start_time
        accelerator.end_training()
        return result

    accelerator.wait_for_everyone()
    comps.modules.update({name: accelerator.unwrap_model(comps.modules[name]) for name in trainable.modules})
    result.exported_step = result.steps
    best = ckpt.best_checkpoint(out) if cfg.train.select == "best" else None
    if best is not None:  # the best-scoring checkpoint's weights replace the last step's
        ckpt.load_weights(best, trainable)
        result.exported_step = int(best.name.split("-")[-1])
        log.info("train.select=best: exporting %s (of %d steps)", best.name, result.steps)
    elif cfg.train.select == "best":
        log.warning("train.select=best: no checkpoint's subject probe fell to monitor.fit_ratio=%s of the base's; "
                    "exporting the last step", cfg.monitor.fit_ratio)
    photos = [e.image for e in data.subject]  # an upscaler's validation input
    if accelerator.is_main_process:
        with ema.applied():  # ema.enabled: the averaged weights are the model written and shown
            # The model is written before the final validation, so a failure there cannot lose it.
            export(comps, out, trainable, cfg.train.method == "lora", cfg.export,
                   card=model_card(cfg, family, None, result, out, model_dir), config_yaml=yaml_text(cfg))
            if cfg.validation.prompts:
                with accelerator.autocast():
                    grid = validate(comps, cfg.validation, cfg.data.resolution, out / "samples", result.steps, logger,
                                    photos, texts if cfg.memory.offload_text_encoders else None)
                update_model_card(out, model_card(cfg, family, grid, result, out, model_dir))
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
                              batch_size=p.batch_size, prompts=tuple(concept.class_prompts))


def ensure_concept_class_images(cfg: TrainConfig, concept, subject, buckets, model_dir: Path, device,
                                dtype=torch.float32) -> list[Path]:
    """A concept's class images: at data.resolution square, or with buckets at the bucket sizes they will be used at.

    Bucketed, `prior.num_class_images` is split over the buckets of the concept's photos in proportion
    to their counts, each bucket's images in their own sub-folder CLASS_DIR/<height>x<width>.
    A folder of the user's own class images is used as it is (its images join the nearest bucket).
    """
    settings = class_image_settings(cfg, concept)
    if buckets is None or concept.class_images_user_supplied:
        return ensure_class_images(model_dir, concept.class_dir, settings, user_supplied=concept.class_images_user_supplied,
                                   device=device, dtype=dtype)
    folder = Path(concept.instance_dir).absolute()
    sizes = [nearest_bucket(e.image.width, e.image.height, buckets) for e in subject if e.path.parent == folder]
    files = []
    for (h, w), n in class_image_counts(sizes, cfg.prior.num_class_images).items():
        files += ensure_class_images(model_dir, Path(concept.class_dir) / f"{h}x{w}",
                                     dataclasses.replace(settings, num_images=n, size=(h, w)), device=device, dtype=dtype)
    return files


@contextlib.contextmanager
def _unwrapped(comps, trainable, accelerator):
    """Pipelines render from the unwrapped modules; the wrapped ones go back to training afterwards."""
    wrapped = {name: comps.modules[name] for name in trainable.modules}
    comps.modules.update({name: accelerator.unwrap_model(m) for name, m in wrapped.items()})
    try:
        with accelerator.autocast():
            yield
    finally:
        comps.modules.update(wrapped)
        for m in wrapped.values():
            m.train()


def _validate(comps, trainable, ema, cfg, data, texts, accelerator, logger, step) -> None:
    """Render the validation grid (main process), with the averaged weights when ema.enabled."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _unwrapped(comps, trainable, accelerator), ema.applied():
            validate(comps, cfg.validation, cfg.data.resolution, Path(cfg.train.output_dir) / "samples", step, logger,
                     [e.image for e in data.subject], texts if cfg.memory.offload_text_encoders else None)


def _score(scorer, probe, cfg, comps, trainable, accelerator) -> tuple[float | None, dict | None]:
    """A checkpoint's train.select=best score (lower is better; None: not a candidate) and the metrics it keeps."""
    if cfg.train.select != "best":
        return None, probe
    if scorer is None:
        return score(probe, cfg.monitor.fit_ratio), probe
    with _unwrapped(comps, trainable, accelerator):
        value, measured = scorer(comps)
    return value, {**probe, "classifier": measured, "score": value}


def summary(result: TrainResult) -> str:
    losses = list(result.losses.values())
    last = f", final loss {losses[-1]:.4f}" if losses else ""
    if result.stopped:
        return (f"stopped on request after step {result.steps}{last}; checkpoint written to {result.output_dir}/checkpoints "
                "(continue with --train.resume)")
    return (f"trained {result.steps} steps ({result.trainable_parameters:,} trainable parameters) in "
            f"{result.seconds:.1f} s{last}; model written to {result.output_dir}")

