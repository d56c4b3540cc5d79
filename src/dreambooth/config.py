"""Training configuration: typed dataclasses, the single source of truth.

The command line (`dreambooth train --optim.lr 2e-6`), YAML files (`optim: {lr: 2e-6}`), the
presets and the resolved `config.yaml` written beside every checkpoint are all instances of
`TrainConfig`. Each field documents itself through `metadata["help"]`, which is what
`dreambooth train --help` prints. Unknown keys and inconsistent settings raise a
`DreamBoothError` that names the key (litgpt's `args.py` is the model for this).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import DreamBoothError

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


@dataclass
class ModelConfig:
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


@dataclass
class ConceptConfig:
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


@dataclass
class DataConfig:
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


@dataclass
class PriorConfig:
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


@dataclass
class LoRAConfig:
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


@dataclass
class TextEncoderConfig:
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


# textual inversion's range (diffusers' example: 5e-4 x batch scaling; kohya 1e-3..5e-3); measured in the miniature world
IDENTIFIER_EMBEDDING_LR = 3e-3


# Config sections that train text encoders, named after the model's module (SDXL has both).
TEXT_ENCODER_SECTIONS = ("text_encoder", "text_encoder_2")


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion"] = _f(
        "adamw", "adamw; adamw8bit (bitsandbytes; CUDA, and CPU with a recent bitsandbytes: 0.50 measured); adafactor (transformers); prodigy (prodigyopt); lion (lion-pytorch).")
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
        "fp32", "Storage dtype of AdamW's two moments. bf16 halves them (4 instead of 8 bytes per weight; for SD 1.5 "
        "7.9 -> 3.9 GB), updated in fp32 and stored with stochastic rounding like the weights. int8 quarters them "
        "(2 bytes per weight, 2.0 GB for SD 1.5): bitsandbytes' blockwise 8-bit quantization, as in its AdamW8bit "
        "(needs bitsandbytes). Needs memory.weights_dtype=bf16 (for fp32 weights use optim.optimizer=adamw8bit).")
    fused_backward: bool = _f(
        False, "Step the optimizer inside the backward pass, one parameter at a time, as soon as its gradient is "
        "ready, then free that gradient: only one parameter's gradient lives at a time (saves the memory of all "
        "gradients; same AdamW maths). Needs optim.max_grad_norm=null (global-norm clipping needs every gradient "
        "at once) and train.gradient_accumulation_steps=1; one process only.")


@dataclass
class MemoryConfig:
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "Autocast precision (accelerate); trainable weights stay fp32.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: much less memory, ~30% slower.")
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
        "them, validation renders from the cached embeddings. Saves their memory on the GPU (SDXL's two encoders: "
        "1.6 GB in bf16; IF's T5-XXL: 9.5 GB). Needs memory.cache_text_embeddings on (no text encoder trained).")
    channels_last: bool = _f(False, "Keep the UNet's 4-D weights in channels_last (NHWC) memory format, the layout "
                             "GPU tensor-core convolutions prefer (on CPU it measured no faster: bench/RESULTS.md).")
    compile_unet: bool = _f(False, "torch.compile the UNet (inductor). The first step pays the compile time (4 s "
                            "with a warm cache to over 2 minutes cold on one CPU thread); on CPU the compiled steps "
                            "measured 0.91-1.04x of eager, the GPU effect is unmeasured. Needs a C++ compiler on CPU.")
    weights_dtype: Literal["fp32", "bf16"] = _f(
        "fp32", "Storage dtype of the trained model's weights. bf16 halves weight and gradient memory; the AdamW "
        "update is computed in fp32 and added with stochastic rounding (round-to-nearest would drop the tiny "
        "DreamBooth-sized updates). Needs memory.mixed_precision=bf16 and optim.optimizer=adamw.")


@dataclass
class ExportConfig:
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
    snr_gamma: Optional[float] = _f(None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's value. null = off.")
    offset_noise: float = _f(0.0, "Offset noise strength (adds a per-channel constant to the noise; helps very dark/bright images).")


@dataclass
class EMAConfig:
    enabled: bool = _f(
        False, "Keep an exponential moving average (EMA) of the trained weights (Polyak averaging) and use it for "
        "validation images and the export; training itself continues on the raw weights. The average smooths the "
        "step-to-step noise of the last updates. Costs one fp32 copy of the trained weights on the training device "
        "(SD 1.5's UNet: 3.4 GB; LoRA adapters: a few MB) and is saved in every checkpoint. A text encoder frozen at "
        "its stop_step keeps the average it had then.")
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


@dataclass
class ValidationConfig:
    prompts: list[str] = _f([], "Prompts rendered every validation.every_n_steps steps and at the end.")
    every_n_steps: int = _f(0, "Validate every N steps (0 = only at the end, if prompts are given).")
    num_images: int = _f(4, "Images per prompt (seeds seed, seed+1, ...).")
    scheduler: Sampler = _f("dpm++", "Sampler for validation images.")
    num_inference_steps: int = _f(25, "Sampling steps.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale.")
    negative_prompt: Optional[str] = _f(None, "Negative prompt.")
    seed: int = _f(0, "First seed; fixed so that grids from different steps are comparable.")


@dataclass
class CheckpointConfig:
    every_n_steps: int = _f(0, "Save a resumable checkpoint every N optimizer steps (0 = never).")
    keep: int = _f(2, "Keep at most this many checkpoints (oldest deleted first).")


@dataclass
class MonitorConfig:
    every_n_steps: int = _f(
        0, "Measure the drift probe every N optimizer steps and at every checkpoint (0 = off): the model's denoising "
        "loss on a fixed set of (class image, class prompt, noise, timestep) triples minus the base's, logged as "
        "`drift` (0 at step 0; positive = the model denoises the class worse than the base did). Without prior "
        "preservation the base first draws probe_size images of the class prompt (see monitor.py).")
    probe_size: int = _f(32, "Probe triples; their timesteps are spread evenly over the noise schedule. Each costs one "
                         "forward pass of the denoiser (and one for the subject probe) per measurement. At 8 the "
                         "probe's own noise dominated on the miniature runs (r 0.51 with a 128 probe; 32: r 0.94).")
    seed: int = _f(0, "Seed of the probe's noise and latent samples; the probe is built once and never touches the "
                   "training generators.")
    fit_ratio: float = _f(
        0.9, "With train.select=best: a checkpoint is a candidate once its subject probe loss (instance photos, "
        "instance prompt) is at most this fraction of the base's, i.e. it has learned the subject.")


@dataclass
class TrainLoopConfig:
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


@dataclass
class TrainConfig:
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

    # ---- consistency checks -----------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise a DreamBoothError naming the key for every inconsistent setting; return self."""
        if not self.model.path:
            raise DreamBoothError("model.path is required: a local diffusers model folder (e.g. --model.path ./stable-diffusion-v1-5)")
        if self.concepts and (self.concept.instance_dir or self.concept.instance_prompt):
            raise DreamBoothError("give either `concept` (one concept) or `concepts` (a list), not both")
        for i, c in enumerate(self.concepts or [self.concept]):
            key = f"concepts[{i}]" if self.concepts else "concept"
            if not c.instance_dir:
                raise DreamBoothError(f"{key}.instance_dir is required: the folder with your subject's photos")
            if not c.instance_prompt:
                raise DreamBoothError(f"{key}.instance_prompt is required, e.g. 'a photo of sks dog'")
            if self.prior.enabled and not c.class_prompt:
                raise DreamBoothError(f"{key}.class_prompt is required with prior.enabled=true, e.g. 'a photo of a dog'")
            if not self.prior.enabled and (c.class_prompt or c.class_dir):
                raise DreamBoothError(f"{key}.class_prompt/class_dir are set but prior.enabled is false: "
                                      "set prior.enabled=true to use them, or remove them")
            if self.prior.source == "model" and (c.class_dir or c.class_images_user_supplied):
                raise DreamBoothError(f"{key}.class_dir/class_images_user_supplied are set but prior.source=model uses "
                                      "no class images: remove them, or use prior.source=images")
            self._check_class_prompts(key, c)
        positive = {"train.max_steps": self.train.max_steps, "train.batch_size": self.train.batch_size,
                    "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
                    "data.resolution": self.data.resolution, "lora.rank": self.lora.rank,
                    "prior.num_class_images": self.prior.num_class_images, "prior.batch_size": self.prior.batch_size,
                    "prior.base_sample_steps": self.prior.base_sample_steps,
                    "validation.num_images": self.validation.num_images, "checkpoint.keep": self.checkpoint.keep}
        for key, value in positive.items():
            if value < 1:
                raise DreamBoothError(f"{key} must be at least 1, got {value}")
        # (data.resolution's multiple is the model's own latent factor, checked once the folder is known)
        _check_choices(self)
        if self.optim.lr <= 0:
            raise DreamBoothError(f"optim.lr must be positive, got {self.optim.lr}")
        if self.train.denoiser_start_step:
            if not 0 < self.train.denoiser_start_step < self.train.max_steps:
                raise DreamBoothError(f"train.denoiser_start_step must be in [0, train.max_steps={self.train.max_steps}), "
                                      f"got {self.train.denoiser_start_step} (the object preset sets 100 of 500): lower it, "
                                      "0 to turn pivotal tuning off, or raise train.max_steps")
            if not self.trains_text_encoder:
                raise DreamBoothError("train.denoiser_start_step freezes the denoiser while a text encoder learns the "
                                      "subject first, but none trains: set text_encoder.train=true and "
                                      "text_encoder.scope=identifier (or leave denoiser_start_step at 0)")
            early = [f"{name}.stop_step={te.stop_step}" for name, te in self.text_encoders().items()
                     if te.train and te.stop_step is not None and te.stop_step <= self.train.denoiser_start_step]
            if early:
                raise DreamBoothError(f"{early[0]} is not after train.denoiser_start_step={self.train.denoiser_start_step}: "
                                      "nothing would train in between; raise the stop step or lower the start")
        for name, te in self.text_encoders().items():
            if not te.train and (te.stop_step is not None or te.lr is not None or te.scope != "all" or te.identifier_lr is not None):
                raise DreamBoothError(f"{name}.lr/identifier_lr/stop_step/scope are set but {name}.train is false: "
                                      f"set {name}.train=true")
            if te.scope == "identifier" and te.lr is not None:
                raise DreamBoothError(f"{name}.lr is the rate of the encoder's weights, which {name}.scope=identifier "
                                      f"leaves frozen: set {name}.identifier_lr instead")
            if te.resolved_identifier_lr is not None:
                if te.resolved_identifier_lr <= 0:
                    raise DreamBoothError(f"{name}.identifier_lr must be positive, got {te.resolved_identifier_lr}")
                if self.train.method == "lora" and te.scope != "identifier":
                    raise DreamBoothError(f"{name}.identifier_lr with {name}.scope=all needs train.method=full: with LoRA "
                                          f"the encoder trains as adapters, and the identifier's embedding trains alone "
                                          f"with {name}.scope=identifier (saved beside the LoRA as a textual-inversion file)")
                missing = [c.instance_prompt for c in self.resolved_concepts() if not c.resolved_identifier]
                if missing:
                    raise DreamBoothError(f"{name}.scope=identifier / identifier_lr train the identifier's embedding, but "
                                          f"the instance prompt {missing[0]!r} names none: set concept.identifier (e.g. sks)")
            if te.train and self.memory.cache_text_embeddings:
                raise DreamBoothError(f"memory.cache_text_embeddings=true cannot be used with {name}.train=true "
                                      "(the embeddings change every step)")
        if self.memory.offload_text_encoders and not self.cache_text_embeddings:
            raise DreamBoothError("memory.offload_text_encoders=true needs the text embeddings cached: train no text "
                                  "encoder and leave memory.cache_text_embeddings on (or unset)")
        if self.augment and self.memory.cache_latents:
            raise DreamBoothError("memory.cache_latents=true cannot be used with data.random_flip or data.center_crop=false "
                                  "(each step sees a different crop); turn the augmentation off or the cache off")
        if not 0 <= self.lora.dropout < 1:
            raise DreamBoothError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        if self.objective.snr_gamma is not None and self.objective.snr_gamma <= 0:
            raise DreamBoothError(f"objective.snr_gamma must be positive (5.0 is the paper's value), got {self.objective.snr_gamma}")
        if not 0 <= self.ema.decay < 1:
            raise DreamBoothError(f"ema.decay must be in [0, 1) (0.999 is a usual cap), got {self.ema.decay}")
        if self.optim.fused_backward:
            if self.optim.max_grad_norm is not None:
                raise DreamBoothError(f"optim.fused_backward=true cannot be used with optim.max_grad_norm={self.optim.max_grad_norm} "
                                      "(global-norm clipping needs every gradient at once, but each parameter is stepped "
                                      "as soon as its own gradient is ready): set optim.max_grad_norm=null")
            if self.train.gradient_accumulation_steps != 1:
                raise DreamBoothError("optim.fused_backward=true cannot be used with train.gradient_accumulation_steps="
                                      f"{self.train.gradient_accumulation_steps} (each backward pass steps the optimizer): "
                                      "set train.gradient_accumulation_steps=1 and raise train.batch_size instead")
            if self.memory.mixed_precision == "fp16":
                raise DreamBoothError("optim.fused_backward=true cannot be used with memory.mixed_precision=fp16 (the fp16 "
                                      "loss scaler must see all gradients before any step): use memory.mixed_precision=bf16")
        if self.memory.weights_dtype == "bf16":
            if self.memory.mixed_precision != "bf16":
                raise DreamBoothError("memory.weights_dtype=bf16 needs memory.mixed_precision=bf16 (the model computes in "
                                      f"bf16), got memory.mixed_precision={self.memory.mixed_precision}")
            if self.optim.optimizer != "adamw":
                raise DreamBoothError("memory.weights_dtype=bf16 needs optim.optimizer=adamw (AdamW with stochastic "
                                      f"rounding), got optim.optimizer={self.optim.optimizer}")
        if self.memory.checkpoint_levels and not self.memory.gradient_checkpointing:
            raise DreamBoothError(f"memory.checkpoint_levels={self.memory.checkpoint_levels} needs "
                                  "memory.gradient_checkpointing=true (it chooses which blocks are checkpointed)")
        if self.memory.checkpoint_levels < 0:
            raise DreamBoothError(f"memory.checkpoint_levels must be 0 (every block) or more, got {self.memory.checkpoint_levels}")
        if self.optim.moments_dtype != "fp32" and self.memory.weights_dtype != "bf16":
            raise DreamBoothError(f"optim.moments_dtype={self.optim.moments_dtype} needs memory.weights_dtype=bf16 (the "
                                  "stochastic-rounding AdamW); set both, or leave optim.moments_dtype=fp32"
                                  + (" and use optim.optimizer=adamw8bit" if self.optim.moments_dtype == "int8" else ""))
        self._check_preservation()
        if self.monitor.every_n_steps < 0 or self.monitor.probe_size < 1 or not 0 < self.monitor.fit_ratio <= 1:
            raise DreamBoothError(f"monitor.every_n_steps must be >= 0 (got {self.monitor.every_n_steps}), monitor.probe_size "
                                  f">= 1 (got {self.monitor.probe_size}), monitor.fit_ratio in (0, 1] (got {self.monitor.fit_ratio})")
        if self.train.select == "best" and not (self.checkpoint.every_n_steps and self.monitor.every_n_steps):
            raise DreamBoothError("train.select=best scores checkpoints with the drift probe: set checkpoint.every_n_steps "
                                  "and monitor.every_n_steps (e.g. both 100), or use train.select=last")
        if self.train.select == "best" and self.ema.enabled:
            raise DreamBoothError("train.select=best with ema.enabled is not supported yet: the export would pair the best "
                                  "checkpoint's weights with the last step's average; use one of them")
        if self.validation.every_n_steps and not self.validation.prompts:
            raise DreamBoothError("validation.every_n_steps is set but validation.prompts is empty: give at least one prompt")
        return self


    def _check_class_prompts(self, key: str, c: ConceptConfig) -> None:
        if not c.class_prompts:
            return
        if not self.prior.enabled:
            raise DreamBoothError(f"{key}.class_prompts is set but prior.enabled is false: set prior.enabled=true "
                                  "(and a class_prompt) to use them, or remove them")
        if self.prior.source == "model":
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

    def _check_preservation(self) -> None:
        p = self.prior
        if p.source == "model" and not p.enabled:
            raise DreamBoothError("prior.source=model is set but prior.enabled is false: set prior.enabled=true "
                                  "(and a concept.class_prompt), or leave prior.source at its default")
        if p.preserve_weight < 0:
            raise DreamBoothError(f"prior.preserve_weight must be 0 (off) or more, got {p.preserve_weight}")
        if p.preserve_prompts and not p.preserve_weight:
            raise DreamBoothError("prior.preserve_prompts is set but prior.preserve_weight is 0: give the "
                                  "knowledge-preservation loss a weight (e.g. prior.preserve_weight=1), or remove the prompts")
        if p.preserve_weight and not p.preserve_prompts and not p.enabled:
            raise DreamBoothError("prior.preserve_weight > 0 needs prompts: give prior.preserve_prompts, or set "
                                  "prior.enabled=true with a concept.class_prompt (the default prompts)")
        if any(not prompt.strip() for prompt in p.preserve_prompts):
            raise DreamBoothError("prior.preserve_prompts holds an empty prompt: remove it")

    def preservation_prompts(self) -> list[str]:
        """Knowledge-preservation prompts: prior.preserve_prompts, else the concepts' class prompts ([] when off)."""
        if not self.prior.preserve_weight:
            return []
        return list(self.prior.preserve_prompts) or sorted({c.class_prompt for c in self.resolved_concepts()})

    @property
    def distills(self) -> bool:
        return self.prior.distills


def _check_choices(obj, prefix: str = "") -> None:
    """Every Literal field holds one of its choices, also when the dataclass was built in Python."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is Literal and value is not None and value not in typing.get_args(tp):
            raise DreamBoothError(f"{prefix}{f.name} must be one of {', '.join(map(str, typing.get_args(tp)))}; got {value!r}")


# ---------------------------------------------------------------------------------------
# dict <-> dataclass, with unknown keys rejected by name
# ---------------------------------------------------------------------------------------

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML or CLI value to the field's type; errors name the key."""
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if value is None:
        if optional:
            return None
        raise DreamBoothError(f"{key} cannot be null")
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise DreamBoothError(f"{key} must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            value = [value]
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise DreamBoothError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on", "false", "no", "0", "off"}:
            return value.lower() in {"true", "yes", "1", "on"}
        raise DreamBoothError(f"{key} must be true or false; got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise DreamBoothError(f"{key} must be a number; got {value!r}")
        try:
            converted = tp(value)
        except (TypeError, ValueError):
            raise DreamBoothError(f"{key} must be {'an integer' if tp is int else 'a number'}; got {value!r}") from None
        if tp is int and isinstance(value, float) and value != converted:
            raise DreamBoothError(f"{key} must be an integer; got {value!r}")
        return converted
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DreamBoothError(f"{key} must be a string; got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys raise with a 'did you mean' hint."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(sorted(names))})"
            raise DreamBoothError(f"unknown setting {prefix}{key}{hint}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in, recursively for nested mappings."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dotted_to_nested(flat: dict[str, Any]) -> dict:
    """{'optim.lr': 1e-6} -> {'optim': {'lr': 1e-6}}"""
    nested: dict = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DreamBoothError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DreamBoothError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise DreamBoothError(f"{path} must hold a mapping of settings at the top level")
    return data


def yaml_text(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML, in field order (what config.yaml files hold)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml_text(cfg))


def build_config(*layers: dict) -> TrainConfig:
    """Merge nested-dict layers (later wins) over the defaults, applying a named preset first.

    A `preset` key in any layer selects a preset; the preset's values sit under every layer, so
    anything the user gives explicitly wins over it.
    """
    from .presets import TRAIN_PRESETS

    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    preset = merged.get("preset")
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            raise DreamBoothError(f"unknown preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
        merged = deep_merge(dotted_to_nested(TRAIN_PRESETS[preset]), merged)
    return from_dict(TrainConfig, merged)


def iter_fields(cls, prefix: str = ""):
    """Yield (dotted key, type, default, help) for every leaf field, for --help and the CLI parser."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        yield prefix + f.name, tp, default, f.metadata.get("help", "")
