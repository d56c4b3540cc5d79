"""The DreamBooth recipe: `train(cfg)` reads top to bottom - plan, setup, loop, finish.

    plan_run   check the settings, the model folder and every photo; find the resume point (no weights yet)
    setup_run  load the model, make class images, choose what trains, optimizer, caches, drift probe, resume
    the loop   per optimizer step: the modules frozen at this step, `gradient_accumulation_steps`
               micro-batches of subject (+ class) examples -> per-sample losses -> weighted sum ->
               backward; clip, step, zero; then checkpoint, probe, validation, a stop request
    finish     the last or the best checkpoint's weights (`train.select`), export, final validation, card

A new feature adds a line to one of these helpers, or to a component they call; the loop names
no model family and no noise schedule (models/family.py, objective.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import objective
from .config import TrainConfig, to_dict, yaml_text
from .export import export, model_card, update_model_card
from .models.trainable import frozen_at
from .monitor import score
from .plan import Plan, plan_run
from .run import Judge, Run, setup_run
from .validation import validate

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


def train(cfg: TrainConfig, judge: Judge | None = None) -> TrainResult:
    """Train `cfg`; `judge` scores checkpoints for train.select=best (default: the drift probe, monitor.score)."""
    start_time = time.time()
    plan = plan_run(cfg)  # model folder, family, buckets, photos, resume point: before any weight loads
    run = setup_run(cfg, plan, judge)  # components, trainable, optimizer, caches, probe, logger: what the loop touches
    result = TrainResult(plan.out, plan.start_step, trainable_parameters=run.trainable.count(),
                         phase_seconds=run.timer.seconds)
    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    bar = tqdm(range(plan.start_step, cfg.train.max_steps), initial=plan.start_step, total=cfg.train.max_steps,
               desc="training", disable=not run.accelerator.is_local_main_process)
    for step in bar:  # `step` optimizer steps are done; this iteration makes step + 1
        step_start = time.perf_counter()
        # Noise, timesteps and latent samples of this step and process come from a generator seeded by
        # (seed, step, rank): processes never share noise, and a resume needs only the step number.
        run.generator.manual_seed(cfg.train.seed * 1_000_003 + step * world + rank)
        run.trainable.set_frozen(frozen_at(step, run.freeze))  # text encoders' stop steps, the pivot
        step_loss = torch.zeros((), device=run.accelerator.device)
        for micro in range(run.accum):
            with run.accelerator.accumulate(*run.models):
                loss = micro_loss(run, step, micro)
                optimizer_step(run, loss)
            step_loss += loss.detach() / run.accum
        run.timer.end_step()
        run.lr_scheduler.step()
        run.ema.update()
        done = step + 1
        result.losses[done] = step_loss.item()  # one host sync per step, not per micro-batch
        result.step_seconds[done] = time.perf_counter() - step_start
        result.steps = done
        lr = run.lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{result.losses[done]:.4f}", lr=f"{lr:.2e}")
        if done % cfg.train.log_every_n_steps == 0:
            run.logger.scalars(done, loss=result.losses[done], lr=lr)
        if after_step(run, done):  # checkpoint, drift probe, validation; True: a stop was requested
            result.stopped = True
            break
    bar.close()
    finish(run, plan, result)
    result.seconds = time.time() - start_time
    return result


def micro_loss(run: Run, step: int, micro: int) -> torch.Tensor:
    """One micro-batch's scalar loss: latents -> conditioning -> per-sample losses -> prior-weighted sum."""
    cfg, comps, family, generator = run.cfg, run.comps, run.comps.family, run.generator
    with run.timer.phase("data"):
        batch = run.data.micro_batch(step, micro, with_pixels=run.latents.needs_pixels)
    with run.timer.phase("forward"), run.accelerator.autocast():
        x0 = run.latents(batch, generator)  # (N, C, H/f, W/f)
        # the frozen base rebuilds its conditioning from this state, so that it draws the same numbers
        cond_state = generator.get_state() if run.base is not None else None
        cond = family.conditioning(comps, run.texts(batch), batch, x0, generator)  # the denoiser's kwargs
        teacher, distilled = None, None
        if run.base is not None:  # distilled samples: the base's own samples as inputs, its predictions as targets
            x0, teacher, distilled = run.base.distill(batch, x0, cond, cond_state, generator)
        per_sample = objective.diffusion_loss(lambda noisy, t: family.predict(comps, noisy, t, cond),
                                              comps.schedule, x0, generator, cfg.objective, teacher, distilled)  # (N,)
        return objective.combine(per_sample, batch.is_prior, cfg.prior.loss_weight, batch.is_preserve,
                                 cfg.prior.preserve_weight)


def optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """Backward, then (on the micro-batch that syncs gradients) clip, step and zero the gradients."""
    with run.timer.phase("backward"):
        run.accelerator.backward(loss)
    with run.timer.phase("optimizer"):
        if run.accelerator.sync_gradients and run.cfg.optim.max_grad_norm is not None:
            run.accelerator.clip_grad_norm_([p for p in run.trainable.named().values() if p.requires_grad],
                                            run.cfg.optim.max_grad_norm)
        run.optimizer.step()  # optim.fused_backward: already done, parameter by parameter
        run.optimizer.zero_grad(set_to_none=True)  # frees gradient memory between steps


def after_step(run: Run, done: int) -> bool:
    """Checkpoint, drift probe and validation after step `done`; True when a stop was requested (checkpointed)."""
    cfg, accelerator = run.cfg, run.accelerator
    # The last step is saved too, so a finished run can be extended (raise max_steps, resume).
    saving = cfg.checkpoint.every_n_steps and (done % cfg.checkpoint.every_n_steps == 0 or done == cfg.train.max_steps)
    probe = None
    if run.monitor is not None and (saving or done % cfg.monitor.every_n_steps == 0):
        with accelerator.autocast():
            probe = run.monitor.measure()
        run.logger.scalars(done, **probe)
    if saving:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save(run, done, *_score(run, probe))
    if cfg.validation.every_n_steps and done % cfg.validation.every_n_steps == 0 and done < cfg.train.max_steps:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with _unwrapped(run), run.ema.applied():  # ema.enabled: validation renders the averaged weights
                _validate(run, done)
    stop_file = run.plan.out / STOP_FILE
    if done == cfg.train.max_steps or not stop_file.exists():
        return False
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ckpt.latest_checkpoint(run.plan.out) != ckpt.checkpoints_root(run.plan.out) / f"step-{done:06d}":
            _save(run, done)  # not saved above
        stop_file.unlink(missing_ok=True)
    log.info("stop requested: checkpoint written at step %d; continue with train.resume", done)
    return True


def _save(run: Run, done: int, best_score: float | None = None, metrics: dict | None = None) -> None:
    """Step `done`'s checkpoint (called on the main process)."""
    ckpt.save_checkpoint(run.plan.out, done, run.trainable, run.optimizer, run.lr_scheduler, run.generator,
                         to_dict(run.cfg), run.cfg.checkpoint.keep, run.plan.fingerprint, run.ema,
                         metrics=metrics, score=best_score)


def finish(run: Run, plan: Plan, result: TrainResult) -> None:
    """The one epilogue: (unless stopped) the selected weights, export, final validation, model card."""
    cfg, accelerator, comps, trainable = run.cfg, run.accelerator, run.comps, run.trainable
    if run.in_backward is not None:
        run.in_backward.remove_hooks()  # the trained model leaves train() as a plain module
    if not result.stopped:
        accelerator.wait_for_everyone()
        comps.modules.update({name: accelerator.unwrap_model(comps.modules[name]) for name in trainable.modules})
        result.exported_step = _select(run, result.steps)
        if accelerator.is_main_process:
            with run.ema.applied():  # ema.enabled: the averaged weights are the model written and shown
                # The model is written before the final validation, so a failure there cannot lose it.
                export(comps, plan.out, trainable, cfg.train.method == "lora", cfg.export,
                       card=model_card(cfg, plan.family, None, result, plan.out, plan.model_dir), config_yaml=yaml_text(cfg))
                if cfg.validation.prompts:
                    with accelerator.autocast():
                        grid = _validate(run, result.steps)
                    update_model_card(plan.out, model_card(cfg, plan.family, grid, result, plan.out, plan.model_dir))
    run.logger.close()
    accelerator.end_training()


# ---- helpers: small, single-purpose pieces of the loop -------------------------------------

def _select(run: Run, last: int) -> int:
    """train.select=best: load the best-scoring checkpoint's weights; returns the step whose weights are exported."""
    if run.cfg.train.select != "best":
        return last
    best = ckpt.best_checkpoint(run.plan.out)
    if best is None:
        log.warning("train.select=best: no checkpoint's subject probe fell to monitor.fit_ratio=%s of the base's; "
                    "exporting the last step", run.cfg.monitor.fit_ratio)
        return last
    ckpt.load_weights(best, run.trainable)  # the best-scoring checkpoint's weights replace the last step's
    log.info("train.select=best: exporting %s (of %d steps)", best.name, last)
    return int(best.name.split("-")[-1])


@contextlib.contextmanager
def _unwrapped(run: Run):
    """Pipelines render from the unwrapped modules; the wrapped ones go back to training afterwards."""
    wrapped = {name: run.comps.modules[name] for name in run.trainable.modules}
    run.comps.modules.update({name: run.accelerator.unwrap_model(m) for name, m in wrapped.items()})
    try:
        with run.accelerator.autocast():
            yield
    finally:
        run.comps.modules.update(wrapped)
        for m in wrapped.values():
            m.train()


def _validate(run: Run, step: int) -> Path:
    """Render the validation grid for `step` (samples/step-NNNNNN.png)."""
    cfg = run.cfg
    return validate(run.comps, cfg.validation, cfg.data.resolution, run.plan.out / "samples", step, run.logger,
                    [e.image for e in run.data.subject], run.texts if cfg.memory.offload_text_encoders else None)


def _score(run: Run, probe: dict | None) -> tuple[float | None, dict | None]:
    """A checkpoint's train.select=best score (lower is better; None: not a candidate) and the metrics it keeps."""
    if run.cfg.train.select != "best":
        return None, probe
    if run.scorer is None:
        return score(probe, run.cfg.monitor.fit_ratio), probe
    with _unwrapped(run):
        value, measured = run.scorer(run.comps)
    return value, {**probe, "classifier": measured, "score": value}


def summary(result: TrainResult) -> str:
    losses = list(result.losses.values())
    last = f", final loss {losses[-1]:.4f}" if losses else ""
    if result.stopped:
        return (f"stopped on request after step {result.steps}{last}; checkpoint written to {result.output_dir}/checkpoints "
                "(continue with --train.resume)")
    return (f"trained {result.steps} steps ({result.trainable_parameters:,} trainable parameters) in "
            f"{result.seconds:.1f} s{last}; model written to {result.output_dir}")
