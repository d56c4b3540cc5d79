"""The settings' dataclasses: every field with its default and help text, and each section's own checks.

`TrainConfig` is made of one dataclass per section (`model`, `concept`, `optim`, ...). Each field
documents itself through `metadata["help"]`, which `dreambooth train --help`, the web UI's form and
the YAML reference show. A section's `check()` refuses values that are wrong whatever the other
sections say (`optim.lr` must be positive); `checks.py` holds the checks that compare sections, and
`TrainConfig.validate()` runs both.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ..errors import DreamBoothError
from .checks import check_across_sections

# Sampler names for validation, class images and `dreambooth sample` (sampling.SCHEDULERS maps
# them to diffusers classes). A Literal, so a typo is refused when the config is read, not after
# training.
Sampler = Literal["ddim", "pndm", "lms", "dpm++", "euler", "euler_a", "ddpm"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help text (shown by --help and in the YAML reference)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _at_least_one(values: dict[str, int]) -> None:
    """Refuse the first count below 1; `values` maps each dotted key to its value."""
    for key, value in values.items():
        if value < 1:
            raise DreamBoothError(f"{key} must be at least 1, got {value}")


@dataclass
class ModelConfig:
    """`model`: the base model to train, and how to read it."""

    path: str = _f("", "Local diffusers-format model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                   "scheduler/), or a single-file SD 1.x/2.x/SDXL checkpoint (.safetensors, .ckpt) as AUTOMATIC1111 and "
                   "ComfyUI keep them: converted once, offline, and cached by the file's hash ($DREAMBOOTH_CACHE).")
    single_file_config: Optional[str] = _f(
        None, "For a single-file model.path: the architecture it follows, as a shipped config (sd15, sd2-512, "
        "sd2-768-v, sdxl-base) or a diffusers folder whose configs and tokenizers match. Default: detected from "
        "the file's keys (SD 2.x's 512/768-v from its metadata, else by asking the UNet).")
    allow_pickle: bool = _f(
        False, "Load a pickle .ckpt that torch's safe loader (weights_only=True) refuses. A pickle can run any code: "
        "use only for files you trust; prefer .safetensors.")
    family: Literal["auto", "sd", "sdxl", "if", "if-ii"] = _f(
        "auto", "Model family; 'auto' reads model_index.json. 'sd' = Stable Diffusion 1.x/2.x, 'sdxl' = SDXL, "
        "'if' = DeepFloyd IF stage I (IFPipeline), 'if-ii' = IF stage II, the upscaler (IFSuperResolutionPipeline).")
    vae_path: Optional[str] = _f(
        None, "A replacement VAE folder (diffusers AutoencoderKL). SDXL's own VAE overflows in fp16, so it is kept in "
        "fp32 under mixed precision; an fp16-safe SDXL VAE (e.g. madebyollin/sdxl-vae-fp16-fix) given here is cast "
        "like the other frozen parts instead.")
    hub_id: Optional[str] = _f(
        None, "The base model's Hugging Face Hub id (ORG/NAME), written as the model card's base_model. Default: the "
        "id in a Hub cache path of model.path (.../models--ORG--NAME/snapshots/...); else the card names none.")

    def check(self) -> None:
        if not self.path:
            raise DreamBoothError("model.path is required: a local diffusers model folder (e.g. --model.path ./stable-diffusion-v1-5)")


@dataclass
class ConceptConfig:
    """`concept` (or each of `concepts`): the subject's photos, its prompt, and its class for prior preservation."""

    instance_dir: str = _f("", "Folder with 5-20 photos of the subject. A 'name.txt' beside 'name.png' is that photo's caption.")
    instance_prompt: str = _f("", "Prompt with the rare identifier and the class noun, e.g. 'a photo of sks dog'.")
    class_prompt: Optional[str] = _f(None, "Prompt for the class without the identifier, e.g. 'a photo of a dog' (prior preservation).")
    class_prompts: list[str] = _f(
        [], "Caption-diverse prior preservation (prior.source=images): several class prompts, e.g. 'a photo of a "
        "black dog', 'a photo of a dog on a beach'. Class image i is generated with prompt i mod their count and "
        "trains with it, so the class noun keeps its attributes as well as its look. Default: class_prompt alone.")
    class_dir: Optional[str] = _f(None, "Folder for class images (generated there if missing). Default: OUTPUT/class_images/<n>.")
    class_images_user_supplied: bool = _f(False, "The class folder holds your own images: use them as they are, never "
                                          "generate or delete. A 'name.txt' beside an image is its prompt (default: class_prompt).")
    identifier: Optional[str] = _f(
        None, "The rare token that names the subject (e.g. sks). A family that trains without it (IF stage II, "
        "the upscaler, as diffusers' guide advises: 'a sks dog' -> 'a dog') drops it from the prompts. Default: the "
        "word before the last word of instance_prompt.")

    @property
    def resolved_identifier(self) -> str:
        words = self.instance_prompt.split()
        return self.identifier or (words[-2] if len(words) >= 2 else "")

    def check(self, key: str) -> None:
        """Refuse a concept without photos or prompt; `key` names it in the message (concept, concepts[1])."""
        if not self.instance_dir:
            raise DreamBoothError(f"{key}.instance_dir is required: the folder with your subject's photos")
        if not self.instance_prompt:
            raise DreamBoothError(f"{key}.instance_prompt is required, e.g. 'a photo of sks dog'")


@dataclass
class DataConfig:
    """`data`: how the photos become training images (resolution, crops, augmentation, buckets)."""

    resolution: int = _f(512, "Training resolution in pixels (512 for SD 1.x and SD 2 base, 768 for SD 2 768-v).")
    center_crop: bool = _f(True, "Centre crop after resizing the shorter side; false = random crop (an augmentation).")
    random_flip: bool = _f(False, "Flip images horizontally at random (an augmentation; avoid for asymmetric subjects or text).")
    min_size: Optional[int] = _f(None, "Refuse images whose shorter side is below this many pixels. Default: resolution / 2.")
    caption_extension: str = _f(".txt", "Per-image caption files: 'photo.txt' beside 'photo.png' replaces the instance prompt.")
    buckets: Optional[bool] = _f(
        None, "Aspect-ratio buckets: each photo trains at the (height, width) of about resolution^2 pixels nearest its "
        "own aspect ratio (sides multiples of the latent factor x 8: 64 px for SD), instead of a square centre crop; "
        "class images are generated at the bucket sizes. Default: the family's (on for SDXL, off for SD 1.x/2.x and IF).")
    bucket_min_side: Optional[int] = _f(None, "Shortest bucket side in pixels (with data.buckets). Default: resolution / 2, rounded up to the step.")
    bucket_max_side: Optional[int] = _f(None, "Longest bucket side in pixels (with data.buckets). Default: resolution x 2.")
    bucket_step: Optional[int] = _f(
        None, "Bucket sides are multiples of this many pixels (with data.buckets); a multiple of the latent factor. "
        "Default: latent factor x 8 (64 for SD), which any SD UNet can halve three times; smaller steps suit "
        "small resolutions but need a UNet whose downsampling divides the latent size.")

    @property
    def min_image_size(self) -> int:
        return self.min_size if self.min_size is not None else self.resolution // 2

    def check(self) -> None:
        # (data.resolution's multiple is the model's own latent factor, checked once the folder is known)
        _at_least_one({"data.resolution": self.resolution})


@dataclass
class PriorConfig:
    """`prior`: prior preservation (class images or the base's own predictions) and knowledge preservation."""

    enabled: bool = _f(False, "Prior preservation: also train on the class prompt so the class noun keeps its meaning.")
    source: Literal["images", "model"] = _f(
        "images", "Where the class prompt's target comes from. images: class images generated by the base model "
        "(the paper's prior preservation; an ordinary denoising loss on them). model: no class images; beside each "
        "subject sample, a sample of the base's own for the class prompt (prior.base_sample_steps DDIM steps), noised "
        "again, whose target is the frozen base model's prediction at that input (distillation): nothing generated "
        "ahead or stored, and the target carries the base's whole prediction instead of one noise draw. Costs a "
        "frozen copy of every trained module for a full fine-tune (none with LoRA, whose base is the same model with "
        "its adapters off) and base forward passes every step.")
    base_sample_steps: int = _f(
        4, "prior.source=model and knowledge preservation: DDIM steps of the base's own sample that each distilled "
        "sample's noisy input is made from; each step is one forward pass of the base per distilled sample.")
    num_class_images: int = _f(100, "Class images per concept (the paper and blog use 100-200; prior.source=images).")
    loss_weight: float = _f(1.0, "Weight of the class-prompt loss relative to the subject loss.")
    preserve_prompts: list[str] = _f(
        [], "Knowledge preservation: general prompts on which the trained model must keep predicting what the frozen "
        "base predicts (the same distillation as prior.source=model, on these prompts: one drawn per subject sample). "
        "Aims at forgetting beyond the class noun (colours, shapes, scenes); use prompts unlike the instance prompt. "
        "Default when prior.preserve_weight > 0: the concepts' class prompts.")
    preserve_weight: float = _f(
        0.0, "Weight of the knowledge-preservation loss relative to the subject loss; 0 = off. Adds one sample per "
        "subject sample, and a frozen copy of the trained modules as prior.source=model does.")
    scheduler: Sampler = _f("dpm++", "Sampler for class images.")
    num_inference_steps: int = _f(25, "Sampling steps per class image (DPM-Solver++ is good at 20-25).")
    guidance_scale: float = _f(7.5, "Classifier-free guidance for class images.")
    negative_prompt: Optional[str] = _f(None, "Negative prompt for class images.")
    seed: int = _f(0, "Class image i is generated with seed + i, so generation is resumable and reproducible.")
    batch_size: int = _f(4, "Class images generated per batch.")

    @property
    def distills(self) -> bool:
        """Some samples' targets are the frozen base model's predictions (prior.source=model, knowledge preservation)."""
        return (self.enabled and self.source == "model") or self.preserve_weight > 0

    def check(self) -> None:
        _at_least_one({"prior.num_class_images": self.num_class_images, "prior.batch_size": self.batch_size,
                       "prior.base_sample_steps": self.base_sample_steps})
        if self.source == "model" and not self.enabled:
            raise DreamBoothError("prior.source=model is set but prior.enabled is false: set prior.enabled=true "
                                  "(and a concept.class_prompt), or leave prior.source at its default")
        if self.preserve_weight < 0:
            raise DreamBoothError(f"prior.preserve_weight must be 0 (off) or more, got {self.preserve_weight}")
        if self.preserve_prompts and not self.preserve_weight:
            raise DreamBoothError("prior.preserve_prompts is set but prior.preserve_weight is 0: give the "
                                  "knowledge-preservation loss a weight (e.g. prior.preserve_weight=1), or remove the prompts")
        if self.preserve_weight and not self.preserve_prompts and not self.enabled:
            raise DreamBoothError("prior.preserve_weight > 0 needs prompts: give prior.preserve_prompts, or set "
                                  "prior.enabled=true with a concept.class_prompt (the default prompts)")
        if any(not prompt.strip() for prompt in self.preserve_prompts):
            raise DreamBoothError("prior.preserve_prompts holds an empty prompt: remove it")


@dataclass
class LoRAConfig:
    """`lora`: the low-rank adapters trained with train.method=lora."""

    rank: int = _f(4, "LoRA rank r (train.method=lora).")
    alpha: float = _f(4.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    use_dora: bool = _f(False, "DoRA (Liu et al. 2024, peft's use_dora) for the UNet's adapters: each adapted weight learns a "
                        "magnitude per output channel apart from its LoRA direction. Slower steps. Text-encoder adapters "
                        "stay plain LoRA, and no kohya-format copy is written (neither loads back through diffusers).")
    unet_targets: Optional[list[str]] = _f(
        None, "UNet modules that get adapters. Default: the family's attention projections (SD/SDXL: to_q, to_k, "
        "to_v, to_out.0; IF adds its text keys and values, add_k_proj and add_v_proj).")
    text_encoder_targets: Optional[list[str]] = _f(
        None, "Text-encoder modules that get adapters. Default: the family's (CLIP: q_proj, k_proj, v_proj, out_proj; "
        "T5: q, k, v, o).")

    def check(self) -> None:
        _at_least_one({"lora.rank": self.rank})
        if not 0 <= self.dropout < 1:
            raise DreamBoothError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TextEncoderConfig:
    """`text_encoder` and `text_encoder_2` (SDXL's second): whether and how this text encoder trains."""

    train: bool = _f(False, "Also train this text encoder (the blog: better results, especially for faces; more memory).")
    scope: Literal["all", "identifier"] = _f(
        "all", "What of this text encoder trains (with train=true). all: its weights (the blog's text-encoder "
        "training). identifier: only the input embeddings of the concepts' identifier tokens (textual inversion of "
        "the identifier, trained beside the denoiser, as in pivotal tuning): every prompt without the identifier "
        "encodes exactly as in the base, so the encoder forgets nothing. With train.method=lora the embedding is "
        "saved beside the adapters as a textual-inversion file (embeddings/IDENTIFIER.safetensors; SD 1.x/2.x).")
    lr: Optional[float] = _f(None, "Learning rate for this text encoder's weights (scope=all). Default: optim.lr.")
    identifier_lr: Optional[float] = _f(
        None, "Learning rate of the identifier's token embeddings, in an optimizer group of their own (no weight "
        "decay); every other row of the token-embedding table then stays the base's. Embeddings learn at textual "
        "inversion's rates, far above a weight's: at the weights' rate the identifier may never come apart from the "
        "class noun ('sks toy' and 'a toy' giving the same images). Default: 3e-3 with scope=identifier; with "
        "scope=all unset, so the whole table trains with the weights at lr (set it, e.g. 3e-3, to give the "
        "identifier its own rate; full fine-tune only).")
    stop_step: Optional[int] = _f(None, "Freeze this text encoder from this optimizer step on (it overfits sooner than the UNet).")

    @property
    def resolved_identifier_lr(self) -> Optional[float]:
        """The identifier embeddings' own learning rate; None: they train with the rest of the encoder (or not at all)."""
        if not self.train:
            return None
        return self.identifier_lr if self.identifier_lr is not None else (IDENTIFIER_EMBEDDING_LR if self.scope == "identifier" else None)

    def check(self, name: str) -> None:
        """Refuse settings that contradict each other; `name` is the section (text_encoder, text_encoder_2)."""
        if not self.train and (self.stop_step is not None or self.lr is not None or self.scope != "all"
                               or self.identifier_lr is not None):
            raise DreamBoothError(f"{name}.lr/identifier_lr/stop_step/scope are set but {name}.train is false: "
                                  f"set {name}.train=true")
        if self.scope == "identifier" and self.lr is not None:
            raise DreamBoothError(f"{name}.lr is the rate of the encoder's weights, which {name}.scope=identifier "
                                  f"leaves frozen: set {name}.identifier_lr instead")
        if self.resolved_identifier_lr is not None and self.resolved_identifier_lr <= 0:
            raise DreamBoothError(f"{name}.identifier_lr must be positive, got {self.resolved_identifier_lr}")


# textual inversion's range (diffusers' example: 5e-4 x batch scaling; kohya 1e-3..5e-3); measured in the miniature world
IDENTIFIER_EMBEDDING_LR = 3e-3


# Config sections that train text encoders, named after the model's module (SDXL has both).
TEXT_ENCODER_SECTIONS = ("text_encoder", "text_encoder_2")


@dataclass
class OptimConfig:
    """`optim`: the optimizer, its learning rate and schedule, and gradient clipping."""

    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion"] = _f(
        "adamw", "adamw; adamw8bit (bitsandbytes; CUDA, and CPU: bitsandbytes 0.50 and newer have CPU kernels); "
        "adafactor (transformers); prodigy (prodigyopt); lion (lion-pytorch).")
    lr: float = _f(5e-6, "Learning rate (the blog: 1e-6..5e-6 for full fine-tuning; LoRA wants ~1e-4).")
    beta1: float = _f(0.9, "Adam beta1.")
    beta2: float = _f(0.999, "Adam beta2.")
    weight_decay: float = _f(1e-2, "Decoupled weight decay.")
    eps: float = _f(1e-8, "Adam epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = _f(
        "constant", "Learning-rate schedule (diffusers' get_scheduler).")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    max_grad_norm: Optional[float] = _f(1.0, "Clip the gradient norm to this value; null = no clipping.")
    moments_dtype: Literal["fp32", "bf16", "int8"] = _f(
        "fp32", "Storage dtype of AdamW's two moments. bf16 halves them (4 instead of 8 bytes per weight), updated in "
        "fp32 and stored with stochastic rounding like the weights. int8 quarters them (2 bytes per weight): "
        "bitsandbytes' blockwise 8-bit quantization, as in its AdamW8bit "
        "(needs bitsandbytes). Needs memory.weights_dtype=bf16 (for fp32 weights use optim.optimizer=adamw8bit).")
    fused_backward: bool = _f(
        False, "Step the optimizer inside the backward pass, one parameter at a time, as soon as its gradient is "
        "ready, then free that gradient: only one parameter's gradient lives at a time (saves the memory of all "
        "gradients; same AdamW maths). Needs optim.max_grad_norm=null (global-norm clipping needs every gradient "
        "at once) and train.gradient_accumulation_steps=1; one process only.")

    def check(self) -> None:
        if self.lr <= 0:
            raise DreamBoothError(f"optim.lr must be positive, got {self.lr}")
        if self.fused_backward and self.max_grad_norm is not None:
            raise DreamBoothError(f"optim.fused_backward=true cannot be used with optim.max_grad_norm={self.max_grad_norm} "
                                  "(global-norm clipping needs every gradient at once, but each parameter is stepped "
                                  "as soon as its own gradient is ready): set optim.max_grad_norm=null")


@dataclass
class MemoryConfig:
    """`memory`: precision, caches and the techniques that trade speed for memory."""

    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "Autocast precision (accelerate); trainable weights stay fp32.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: much less memory, slower steps "
                                        "(each checkpointed block runs its forward pass twice).")
    checkpoint_levels: int = _f(
        0, "With gradient_checkpointing: recompute only the UNet blocks at the N highest resolutions (down and up "
        "blocks of the first N levels, where activations are largest); 0 = every block. Partial checkpointing buys "
        "back part of the speed for part of the memory (bench/RESULTS.md).")
    attention: Literal["sdpa", "xformers", "classic"] = _f(
        "sdpa", "UNet attention kernel: PyTorch SDPA (memory-efficient, the default), xFormers, or classic (the whole "
        "attention matrix in memory: only to measure what the others save, bench/RESULTS.md).")
    cache_latents: Optional[bool] = _f(None, "Encode each image with the VAE once. Default: on when augmentation is off.")
    cache_text_embeddings: Optional[bool] = _f(
        None, "Encode each prompt once (the validation and negative prompts too), and keep the embeddings in "
        "OUTPUT/cache with their provenance, so a resumed run reuses them. Default: on when no text encoder trains.")
    offload_text_encoders: bool = _f(
        False, "Once their embeddings are cached, keep the frozen text encoders on the CPU: nothing on the GPU needs "
        "them, validation renders from the cached embeddings. Saves their memory on the GPU, most where they are "
        "large (SDXL's two encoders, IF's T5-XXL). Needs memory.cache_text_embeddings on (no text encoder trained).")
    channels_last: bool = _f(False, "Keep the UNet's 4-D weights in channels_last (NHWC) memory format, the layout "
                             "GPU tensor-core convolutions prefer; a GPU option, no gain on CPU (bench/RESULTS.md).")
    compile_unet: bool = _f(False, "torch.compile the UNet (inductor). The first step pays the compile time (seconds "
                            "with a warm inductor cache, minutes cold); on CPU the compiled steps run about as fast as "
                            "eager (bench/RESULTS.md). Needs a C++ compiler on CPU.")
    weights_dtype: Literal["fp32", "bf16"] = _f(
        "fp32", "Storage dtype of the trained model's weights. bf16 halves weight and gradient memory; the AdamW "
        "update is computed in fp32 and added with stochastic rounding (round-to-nearest would drop the tiny "
        "DreamBooth-sized updates). Needs memory.mixed_precision=bf16 and optim.optimizer=adamw.")

    def check(self) -> None:
        if self.weights_dtype == "bf16" and self.mixed_precision != "bf16":
            raise DreamBoothError("memory.weights_dtype=bf16 needs memory.mixed_precision=bf16 (the model computes in "
                                  f"bf16), got memory.mixed_precision={self.mixed_precision}")
        if self.checkpoint_levels and not self.gradient_checkpointing:
            raise DreamBoothError(f"memory.checkpoint_levels={self.checkpoint_levels} needs "
                                  "memory.gradient_checkpointing=true (it chooses which blocks are checkpointed)")
        if self.checkpoint_levels < 0:
            raise DreamBoothError(f"memory.checkpoint_levels must be 0 (every block) or more, got {self.checkpoint_levels}")


@dataclass
class ExportConfig:
    """`export`: which files the trained model is written as, and their verification."""

    single_file: bool = _f(
        False, "Full fine-tune: also write model.safetensors, one file in the original layout AUTOMATIC1111 and "
        "ComfyUI load (LDM for SD 1.x/2.x, SGM for SDXL). LoRA always gets a kohya-format copy beside diffusers'.")
    single_file_precision: Literal["fp16", "fp32"] = _f(
        "fp16", "Weights of model.safetensors: fp16 (half the size, what A1111 users share) or fp32 (exact).")
    verify: bool = _f(
        True, "Load every export back through an independent path (diffusers' single-file loader, load_lora_weights) "
        "and compare network outputs with the trained model; a mismatch is an error that keeps the diffusers output.")
    save_text_encoder: bool = _f(
        True, "Write the text encoder(s) into a full fine-tune's pipeline folder. false leaves out an untrained one "
        "(IF's T5-XXL is 4.8 B weights; diffusers' --skip_save_text_encoder): load the folder with the base's encoder.")


@dataclass
class ObjectiveConfig:
    """`objective`: the training loss (its weighting over timesteps, offset noise); the model's noise schedule
    (schedule.py) decides which settings apply, and refuses the others once the model folder is known
    (models.load.check_settings)."""

    snr_gamma: Optional[float] = _f(None, "DDPM models: Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's value. null = off.")
    offset_noise: float = _f(0.0, "DDPM models: offset noise strength (adds a per-channel constant to the noise; helps very dark/bright images).")
    timestep_density: Literal["logit_normal", "mode", "uniform"] = _f(
        "logit_normal", "Rectified-flow models (SD3, FLUX.1): how each sample's noise level s in (0, 1) is drawn. "
        "logit_normal: sigmoid of N(logit_mean, logit_std), most samples at middle noise levels (SD3's choice, Esser "
        "et al. 2024); mode: mode_scale moves weight to the middle (> 0) or the ends (< 0); uniform.")
    logit_mean: float = _f(0.0, "Rectified flow, timestep_density=logit_normal: the normal's mean (> 0 draws more noise).")
    logit_std: float = _f(1.0, "Rectified flow, timestep_density=logit_normal: the normal's standard deviation.")
    mode_scale: float = _f(1.29, "Rectified flow, timestep_density=mode: the scale s in [-1, 2 / (pi - 2)] (SD3's 1.29).")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = _f(
        "none", "Rectified-flow models: per-sample loss weight of noise level s: none; sigma_sqrt, 1 / s^2; cosmap, "
        "2 / (pi (1 - 2s + 2s^2)) (as diffusers' SD3 scripts).")
    shift: Optional[float] = _f(
        None, "Rectified-flow models: shift the training noise levels, s -> shift s / (1 + (shift - 1) s) (> 1: more "
        "noise). Default: the model's own, its scheduler config's shift, or the resolution-dependent shift its "
        "use_dynamic_shifting asks for. Sampling always uses the model's own.")

    def changed(self, names: tuple[str, ...]) -> list[str]:
        """Those of the fields `names` that differ from their defaults."""
        return [f.name for f in dataclasses.fields(self) if f.name in names and getattr(self, f.name) != f.default]

    def check(self) -> None:
        """This section's own consistency (which settings the model's schedule reads is checked with the model)."""
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise DreamBoothError(f"objective.snr_gamma must be positive (5.0 is the paper's value), got {self.snr_gamma}")
        if self.logit_std <= 0:
            raise DreamBoothError(f"objective.logit_std must be positive (1.0 is SD3's), got {self.logit_std}")
        if not -1 <= self.mode_scale <= 2 / (math.pi - 2):  # outside, the mode density's map of [0, 1) is not monotone
            raise DreamBoothError(f"objective.mode_scale must be in [-1, {2 / (math.pi - 2):.3f}] (1.29 is SD3's), got {self.mode_scale}")
        if self.shift is not None and self.shift <= 0:
            raise DreamBoothError(f"objective.shift must be positive (3.0 is SD3's), got {self.shift}")
        for name, density in (("logit_mean", "logit_normal"), ("logit_std", "logit_normal"), ("mode_scale", "mode")):
            if self.changed((name,)) and self.timestep_density != density:
                raise DreamBoothError(f"objective.{name} is set but objective.timestep_density={self.timestep_density}: "
                                      f"it shapes timestep_density={density}; set that, or remove objective.{name}")


@dataclass
class EMAConfig:
    """`ema`: an exponential moving average of the trained weights, for validation and the export."""

    enabled: bool = _f(
        False, "Keep an exponential moving average (EMA) of the trained weights (Polyak averaging) and use it for "
        "validation images and the export; training itself continues on the raw weights. The average smooths the "
        "step-to-step noise of the last updates. Costs one fp32 copy of the trained weights on the training device "
        "(large for a full fine-tune, small for LoRA adapters) and is saved in every checkpoint. A text encoder "
        "frozen at its stop_step keeps the average it had then.")
    decay: float = _f(
        0.999, "The longest memory the average may have: after an update, average = decay * average + (1 - decay) * "
        "weights. With ema.warmup on, the decay only reaches this cap after about 9 x 1 / (1 - decay) updates "
        "(8,991 for 0.999), so in a DreamBooth-length run the warm-up, not this value, sets the averaging.")
    warmup: bool = _f(
        True, "Grow the decay with the run: update n uses min(ema.decay, n / (n + 9)) (diffusers' EMAModel default), "
        "so after T steps the average weighs step t's weights in proportion to t^8 (Karras et al. 2024's "
        "power-function EMA, gamma 8): centred a tenth of the run back, whatever its length. false: "
        "ema.decay from the second update on; at 0.999 the first weights still hold 67% of the average after 400 "
        "steps, so a short run's average lags far behind its weights.")

    def check(self) -> None:
        if not 0 <= self.decay < 1:
            raise DreamBoothError(f"ema.decay must be in [0, 1) (0.999 is a usual cap), got {self.decay}")


@dataclass
class ValidationConfig:
    """`validation`: the images rendered during and after training to watch it."""

    prompts: list[str] = _f([], "Prompts rendered every validation.every_n_steps steps and at the end.")
    every_n_steps: int = _f(0, "Validate every N steps (0 = only at the end, if prompts are given).")
    num_images: int = _f(4, "Images per prompt (seeds seed, seed+1, ...).")
    scheduler: Sampler = _f("dpm++", "Sampler for validation images.")
    num_inference_steps: int = _f(25, "Sampling steps.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale.")
    negative_prompt: Optional[str] = _f(None, "Negative prompt.")
    seed: int = _f(0, "First seed; fixed so that grids from different steps are comparable.")

    def check(self) -> None:
        _at_least_one({"validation.num_images": self.num_images})
        if self.every_n_steps and not self.prompts:
            raise DreamBoothError("validation.every_n_steps is set but validation.prompts is empty: give at least one prompt")


@dataclass
class CheckpointConfig:
    """`checkpoint`: resumable checkpoints during training."""

    every_n_steps: int = _f(0, "Save a resumable checkpoint every N optimizer steps (0 = never).")
    keep: int = _f(2, "Keep at most this many checkpoints (oldest deleted first).")

    def check(self) -> None:
        _at_least_one({"checkpoint.keep": self.keep})


@dataclass
class MonitorConfig:
    """`monitor`: the drift probe, which measures how far the class has moved from the base."""

    every_n_steps: int = _f(
        0, "Measure the drift probe every N optimizer steps and at every checkpoint (0 = off): the model's denoising "
        "loss on a fixed set of (class image, class prompt, noise, timestep) triples minus the base's, logged as "
        "`drift` (0 at step 0; positive = the model denoises the class worse than the base did). Without prior "
        "preservation the base first draws probe_size images of the class prompt (see monitor.py).")
    probe_size: int = _f(32, "Probe triples; their timesteps are spread evenly over the noise schedule. Each costs one "
                         "forward pass of the denoiser (and one for the subject probe) per measurement. A smaller "
                         "probe is cheaper but noisier: too small, and it measures its own noise more than the drift "
                         "(bench/RESULTS.md).")
    seed: int = _f(0, "Seed of the probe's noise and latent samples; the probe is built once and never touches the "
                   "training generators.")
    fit_ratio: float = _f(
        0.9, "With train.select=best: a checkpoint is a candidate once its subject probe loss (instance photos, "
        "instance prompt) is at most this fraction of the base's, i.e. it has learned the subject.")

    def check(self) -> None:
        if self.every_n_steps < 0 or self.probe_size < 1 or not 0 < self.fit_ratio <= 1:
            raise DreamBoothError(f"monitor.every_n_steps must be >= 0 (got {self.every_n_steps}), monitor.probe_size "
                                  f">= 1 (got {self.probe_size}), monitor.fit_ratio in (0, 1] (got {self.fit_ratio})")


@dataclass
class TrainLoopConfig:
    """`train`: the loop itself (steps, batch, seed, resume, output) and which checkpoint is exported."""

    output_dir: str = _f("outputs/dreambooth", "Where the trained model, samples, checkpoints and logs go.")
    method: Literal["full", "lora"] = _f("full", "full = fine-tune all UNet weights; lora = train low-rank adapters (peft).")
    max_steps: int = _f(400, "Optimizer steps (the blog: ~400 at batch 4 for objects at lr 2e-6).")
    denoiser_start_step: int = _f(
        0, "Pivotal tuning: the denoiser (its weights, or its adapters with LoRA) stays frozen until this optimizer "
        "step, while the trained text encoder - with text_encoder.scope=identifier, the identifier's embedding alone, "
        "i.e. textual inversion against the base denoiser - learns the subject first; then both train. Counted "
        "within train.max_steps. 0: everything trains from the start.")
    batch_size: int = _f(1, "Subject images per micro-batch (the same number of class images is added with prior preservation).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    seed: int = _f(0, "Seed for data order, augmentation, noise and timesteps.")
    resume: bool = _f(False, "Continue from OUTPUT/checkpoints/latest.json.")
    log_every_n_steps: int = _f(1, "Write loss and learning rate to TensorBoard every N steps.")
    time_phases: bool = _f(False, "Synchronise the GPU between data/forward/backward/optimizer to time each (bench; a bit slower).")
    select: Literal["last", "best"] = _f(
        "last", "Which checkpoint becomes the exported model: the last step's, or the best-scoring one (needs "
        "checkpoint.every_n_steps and monitor.every_n_steps): among checkpoints whose subject probe loss fell to "
        "monitor.fit_ratio of the base's, the one with the lowest drift; the last if none did.")

    def check(self) -> None:
        _at_least_one({"train.max_steps": self.max_steps, "train.batch_size": self.batch_size,
                       "train.gradient_accumulation_steps": self.gradient_accumulation_steps})
        if self.denoiser_start_step and not 0 < self.denoiser_start_step < self.max_steps:
            raise DreamBoothError(f"train.denoiser_start_step must be in [0, train.max_steps={self.max_steps}), "
                                  f"got {self.denoiser_start_step} (the object preset sets 100 of 500): lower it, "
                                  "0 to turn pivotal tuning off, or raise train.max_steps")


@dataclass
class TrainConfig:
    """All settings: one field per section, plus the derived settings the trainer reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    concepts: list[ConceptConfig] = _f([], "Several concepts (YAML only): a list of {instance_dir, instance_prompt, class_prompt, class_dir}.")
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    text_encoder_2: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # SDXL's OpenCLIP bigG
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    preset: Optional[str] = _f(None, "Start from a preset (object, face, style, fast, low-memory); any field given explicitly overrides it.")

    # ---- derived settings -------------------------------------------------------------
    def resolved_concepts(self) -> list[ConceptConfig]:
        """The concept list: `concepts` when given, else the single `concept`; class_dir defaults filled in."""
        concepts = [dataclasses.replace(c) for c in (self.concepts or [self.concept])]
        for i, c in enumerate(concepts):
            if self.prior.enabled and self.prior.source == "images" and not c.class_dir:
                c.class_dir = str(Path(self.train.output_dir) / "class_images" / str(i))
        return concepts

    @property
    def augment(self) -> bool:
        return self.data.random_flip or not self.data.center_crop

    def text_encoders(self) -> dict[str, TextEncoderConfig]:
        """Text-encoder module name -> its section (text_encoder, text_encoder_2)."""
        return {name: getattr(self, name) for name in TEXT_ENCODER_SECTIONS}

    @property
    def trains_text_encoder(self) -> bool:
        return any(te.train for te in self.text_encoders().values())

    @property
    def trains_identifier_embedding(self) -> bool:
        """Some text encoder learns only the identifier's embedding (a LoRA then saves it as a textual-inversion file)."""
        return any(te.train and te.scope == "identifier" for te in self.text_encoders().values())

    @property
    def cache_latents(self) -> bool:
        return (not self.augment) if self.memory.cache_latents is None else self.memory.cache_latents

    @property
    def cache_text_embeddings(self) -> bool:
        default = not self.trains_text_encoder
        return default if self.memory.cache_text_embeddings is None else self.memory.cache_text_embeddings

    def named_concepts(self) -> list[tuple[str, ConceptConfig]]:
        """The concepts as given, each with the key that names it in messages (concept, concepts[0], ...)."""
        if self.concepts:
            return [(f"concepts[{i}]", c) for i, c in enumerate(self.concepts)]
        return [("concept", self.concept)]

    def preservation_prompts(self) -> list[str]:
        """Knowledge-preservation prompts: prior.preserve_prompts, else the concepts' class prompts ([] when off)."""
        if not self.prior.preserve_weight:
            return []
        return list(self.prior.preserve_prompts) or sorted({c.class_prompt for c in self.resolved_concepts()})

    @property
    def distills(self) -> bool:
        return self.prior.distills

    # ---- consistency checks -----------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise a DreamBoothError naming the key for the first inconsistent setting; return self.

        Every section checks its own fields first, in field order; then the checks across sections
        (checks.py) run.
        """
        check_choices(self)
        self.model.check()
        if self.concepts and (self.concept.instance_dir or self.concept.instance_prompt):
            raise DreamBoothError("give either `concept` (one concept) or `concepts` (a list), not both")
        for key, concept in self.named_concepts():
            concept.check(key)
        self.data.check()
        self.prior.check()
        self.lora.check()
        for name, text_encoder in self.text_encoders().items():
            text_encoder.check(name)
        self.optim.check()
        self.memory.check()
        self.objective.check()
        self.ema.check()
        self.validation.check()
        self.checkpoint.check()
        self.monitor.check()
        self.train.check()
        check_across_sections(self)
        return self


# ---------------------------------------------------------------------------------------
# the fields' types, read back from the annotations (also for parsing and --help)
# ---------------------------------------------------------------------------------------

def field_types(cls) -> dict[str, Any]:
    """Field name -> its annotation, resolved (the module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def strip_optional(tp):
    """`Optional[X]` -> X; any other type unchanged."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def check_choices(obj, prefix: str = "") -> None:
    """Every Literal field holds one of its choices, also when the dataclass was built in Python."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), strip_optional(hints[f.name])
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is Literal and value is not None and value not in typing.get_args(tp):
            raise DreamBoothError(f"{prefix}{f.name} must be one of {', '.join(map(str, typing.get_args(tp)))}; got {value!r}")
