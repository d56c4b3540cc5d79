"""The checks across sections: settings that are each valid alone but contradict one another.

`TrainConfig.validate()` runs every section's own `check()` (schema.py) and then
`check_across_sections`. Each message names the keys involved and how to make them agree.
"""

from __future__ import annotations

from ..errors import DreamBoothError

# `TrainConfig` and `ConceptConfig` below are schema.py's. They are not imported: schema.py
# imports this module (TrainConfig.validate runs these checks), and the annotations are never
# evaluated (postponed), so the import graph stays one-way.


def check_across_sections(cfg: TrainConfig) -> None:
    """Raise a DreamBoothError for the first setting that contradicts another section."""
    check_class_data(cfg)
    check_pivotal_tuning(cfg)
    check_text_encoders(cfg)
    check_caches(cfg)
    check_fused_backward(cfg)
    check_bf16_training(cfg)
    check_select_best(cfg)


def check_class_data(cfg: TrainConfig) -> None:
    """Each concept's class prompt, class folder and class prompts agree with the prior section."""
    for key, c in cfg.named_concepts():
        if cfg.prior.enabled and not c.class_prompt:
            raise DreamBoothError(f"{key}.class_prompt is required with prior.enabled=true, e.g. 'a photo of a dog'")
        if not cfg.prior.enabled and (c.class_prompt or c.class_dir):
            raise DreamBoothError(f"{key}.class_prompt/class_dir are set but prior.enabled is false: "
                                  "set prior.enabled=true to use them, or remove them")
        if cfg.prior.source == "model" and (c.class_dir or c.class_images_user_supplied):
            raise DreamBoothError(f"{key}.class_dir/class_images_user_supplied are set but prior.source=model uses "
                                  "no class images: remove them, or use prior.source=images")
        _check_class_prompts(cfg, key, c)


def _check_class_prompts(cfg: TrainConfig, key: str, c: ConceptConfig) -> None:
    if not c.class_prompts:
        return
    if not cfg.prior.enabled:
        raise DreamBoothError(f"{key}.class_prompts is set but prior.enabled is false: set prior.enabled=true "
                              "(and a class_prompt) to use them, or remove them")
    if cfg.prior.source == "model":
        raise DreamBoothError(f"{key}.class_prompts makes class images, which prior.source=model has none of: "
                              "give these prompts as prior.preserve_prompts (with a prior.preserve_weight), which "
                              "distils the base on them the same way, or use prior.source=images")
    if c.class_images_user_supplied:
        raise DreamBoothError(f"{key}.class_prompts sets the prompts generated class images are made with, but "
                              "class_images_user_supplied is true: caption your own class images with a 'name.txt' "
                              "beside each instead, or remove class_prompts")
    if any(not prompt.strip() for prompt in c.class_prompts):
        raise DreamBoothError(f"{key}.class_prompts holds an empty prompt: remove it")
    identifier = c.resolved_identifier
    if identifier and any(identifier in prompt.split() for prompt in c.class_prompts):
        raise DreamBoothError(f"{key}.class_prompts must not name the identifier {identifier!r}: they describe the "
                              "class in general (e.g. 'a photo of a black dog'), which prior preservation keeps")


def check_pivotal_tuning(cfg: TrainConfig) -> None:
    """train.denoiser_start_step needs a text encoder that trains, and trains past the start."""
    start = cfg.train.denoiser_start_step
    if not start:
        return
    if not cfg.trains_text_encoder:
        raise DreamBoothError("train.denoiser_start_step freezes the denoiser while a text encoder learns the "
                              "subject first, but none trains: set text_encoder.train=true and "
                              "text_encoder.scope=identifier (or leave denoiser_start_step at 0)")
    early = [f"{name}.stop_step={te.stop_step}" for name, te in cfg.text_encoders().items()
             if te.train and te.stop_step is not None and te.stop_step <= start]
    if early:
        raise DreamBoothError(f"{early[0]} is not after train.denoiser_start_step={start}: "
                              "nothing would train in between; raise the stop step or lower the start")


def check_text_encoders(cfg: TrainConfig) -> None:
    """A trained identifier embedding needs the method, and prompts, that carry it; trained encoders are not cached."""
    for name, te in cfg.text_encoders().items():
        if te.resolved_identifier_lr is not None:
            if cfg.train.method == "lora" and te.scope != "identifier":
                raise DreamBoothError(f"{name}.identifier_lr with {name}.scope=all needs train.method=full: with LoRA "
                                      f"the encoder trains as adapters, and the identifier's embedding trains alone "
                                      f"with {name}.scope=identifier (saved beside the LoRA as a textual-inversion file)")
            missing = [c.instance_prompt for c in cfg.resolved_concepts() if not c.resolved_identifier]
            if missing:
                raise DreamBoothError(f"{name}.scope=identifier / identifier_lr train the identifier's embedding, but "
                                      f"the instance prompt {missing[0]!r} names none: set concept.identifier (e.g. sks)")
        if te.train and cfg.memory.cache_text_embeddings:
            raise DreamBoothError(f"memory.cache_text_embeddings=true cannot be used with {name}.train=true "
                                  "(the embeddings change every step)")


def check_caches(cfg: TrainConfig) -> None:
    """What is cached once must not change from step to step."""
    if cfg.memory.offload_text_encoders and not cfg.cache_text_embeddings:
        raise DreamBoothError("memory.offload_text_encoders=true needs the text embeddings cached: train no text "
                              "encoder and leave memory.cache_text_embeddings on (or unset)")
    if cfg.augment and cfg.memory.cache_latents:
        raise DreamBoothError("memory.cache_latents=true cannot be used with data.random_flip or data.center_crop=false "
                              "(each step sees a different crop); turn the augmentation off or the cache off")


def check_fused_backward(cfg: TrainConfig) -> None:
    """optim.fused_backward steps each parameter in the backward pass: one backward per step, no loss scaler."""
    if not cfg.optim.fused_backward:
        return
    if cfg.train.gradient_accumulation_steps != 1:
        raise DreamBoothError("optim.fused_backward=true cannot be used with train.gradient_accumulation_steps="
                              f"{cfg.train.gradient_accumulation_steps} (each backward pass steps the optimizer): "
                              "set train.gradient_accumulation_steps=1 and raise train.batch_size instead")
    if cfg.memory.mixed_precision == "fp16":
        raise DreamBoothError("optim.fused_backward=true cannot be used with memory.mixed_precision=fp16 (the fp16 "
                              "loss scaler must see all gradients before any step): use memory.mixed_precision=bf16")


def check_bf16_training(cfg: TrainConfig) -> None:
    """bf16 weights and low-precision moments need the stochastic-rounding AdamW."""
    if cfg.memory.weights_dtype == "bf16" and cfg.optim.optimizer != "adamw":
        raise DreamBoothError("memory.weights_dtype=bf16 needs optim.optimizer=adamw (AdamW with stochastic "
                              f"rounding), got optim.optimizer={cfg.optim.optimizer}")
    if cfg.optim.moments_dtype != "fp32" and cfg.memory.weights_dtype != "bf16":
        raise DreamBoothError(f"optim.moments_dtype={cfg.optim.moments_dtype} needs memory.weights_dtype=bf16 (the "
                              "stochastic-rounding AdamW); set both, or leave optim.moments_dtype=fp32"
                              + (" and use optim.optimizer=adamw8bit" if cfg.optim.moments_dtype == "int8" else ""))


def check_select_best(cfg: TrainConfig) -> None:
    """train.select=best needs scored checkpoints, and one set of weights to export."""
    if cfg.train.select != "best":
        return
    if not (cfg.checkpoint.every_n_steps and cfg.monitor.every_n_steps):
        raise DreamBoothError("train.select=best scores checkpoints with the drift probe: set checkpoint.every_n_steps "
                              "and monitor.every_n_steps (e.g. both 100), or use train.select=last")
    if cfg.ema.enabled:
        raise DreamBoothError("train.select=best with ema.enabled is not supported yet: the export would pair the best "
                              "checkpoint's weights with the last step's average; use one of them")
