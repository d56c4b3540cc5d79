"""Named starting points distilled from the Hugging Face DreamBooth blog post (Nov 2022).

Each preset is a set of dotted overrides applied *under* the user's settings, so any field the
user gives explicitly wins. The numbers are the blog's findings for Stable Diffusion 1.x:

- objects: "a learning rate of 2e-6 with 400 training steps works well for objects" at batch 4;
  prior preservation "doesn't seem to make a huge difference" for them (the miniature world's bar
  disagrees on forgetting, so the preset keeps it, from the base model, and trains the identifier).
- faces: "1e-6 (or 2e-6) with ~1200 steps" at batch 2; "prior preservation is important to avoid
  overfitting when training on faces"; "training the text encoder ... has a big impact on quality".
- style: no class noun to protect, so no prior preservation; flips are harmless for most styles.

We reach the blog's batch sizes by gradient accumulation over batch 1, which gives the same
update with the memory of batch 1.
"""

# Every layer of a Stable Diffusion (1.x/2.x, XL) UNet's attention blocks and resnets, for LoRA: the attention
# projections (the family's default targets), the blocks' input/output projections and feed-forward, and the
# resnets' convolutions and time projections (peft adapts Conv2d layers too; kohya calls such a LoRA LoCon).
UNET_LORA_ALL_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "time_emb_proj")

TRAIN_PRESETS: dict[str, dict[str, object]] = {
    # The blog's rate, steps and batch, with what the miniature world's bar kept (docs/experiments/acceptance-bar.md;
    # the demo's default is this recipe's miniature analogue): the text encoder learns only the
    # identifier's embedding, alone for the first 100 steps (pivotal tuning; the miniature default: 200 before
    # 600) and at the miniature default's 1e-3 throughout, and the class prompt's target is the frozen base's own
    # prediction (no class images to generate; needs concept.class_prompt). Knowledge preservation needs general
    # prompts of your own: --prior.preserve_prompts [...] --prior.preserve_weight 1. The pivot's length and the
    # embedding's rate are not measured at full scale.
    "object": {
        "optim.lr": 2e-6,
        "train.max_steps": 500,  # the blog's 400 steps of the denoiser, after 100 of the identifier alone
        "train.denoiser_start_step": 100,
        "train.batch_size": 1,
        "train.gradient_accumulation_steps": 4,  # = the blog's batch 4
        "text_encoder.train": True,
        "text_encoder.scope": "identifier",
        "text_encoder.identifier_lr": 1e-3,
        "prior.enabled": True,
        "prior.source": "model",
    },
    # The same recipe as LoRA (SD 1.x/2.x), without the pivot (the miniature LoRA default does without it): the
    # denoiser trains as rank-8 adapters on every layer of its attention blocks and resnets, at the rate of
    # diffusers' DreamBooth LoRA examples (1e-4, as sdxl-lora below; the blog covers full fine-tuning only), with
    # the blog's steps and batch; not measured at full scale. The trained identifier (at textual inversion's 3e-3)
    # is saved beside the adapters as a textual-inversion file (embeddings/). In the miniature world adapters on
    # the attention projections alone (the diffusers script's targets) did not learn the subject (subject
    # fidelity 0.44 and 0.53 at lr 1e-3 and 3e-3) where these layers did (docs/experiments/acceptance-bar.md).
    "object-lora": {
        "train.method": "lora",
        "lora.rank": 8,
        "lora.alpha": 8.0,
        "lora.unet_targets": list(UNET_LORA_ALL_LAYERS),
        "optim.lr": 1e-4,
        "train.max_steps": 400,
        "train.batch_size": 1,
        "train.gradient_accumulation_steps": 4,
        "text_encoder.train": True,
        "text_encoder.scope": "identifier",
        "prior.enabled": True,
        "prior.source": "model",
    },
    "face": {
        "optim.lr": 1e-6,
        "train.max_steps": 1000,  # the blog: 800-1200
        "train.batch_size": 1,
        "train.gradient_accumulation_steps": 2,  # = the blog's batch 2
        "prior.enabled": True,
        "prior.num_class_images": 200,
        "text_encoder.train": True,
    },
    "style": {
        "optim.lr": 2e-6,
        "train.max_steps": 800,
        "train.batch_size": 1,
        "train.gradient_accumulation_steps": 4,
        "data.random_flip": True,
    },
    # SDXL (model.family sdxl). Its native resolution is 1024 px: "The default resolution of SDXL is
    # 1024x1024" (kohya-ss/sd-scripts docs/train_SDXL-en.md). Sources of each number below:
    # sdxl-lora, diffusers' examples/dreambooth/README_sdxl.md command for
    # train_dreambooth_lora_sdxl.py: resolution 1024, learning_rate 1e-4, train_batch_size 1 x
    # gradient_accumulation_steps 4, max_train_steps 500, constant schedule without warmup, and the
    # script's rank 4 with lora_alpha = rank. The text encoders stay frozen, as in that command and
    # as kohya recommends for SDXL LoRA ("--network_train_unet_only ... highly recommended",
    # train_SDXL-en.md); their embeddings are then cached (both encoders, pooled included).
    "sdxl-lora": {
        "data.resolution": 1024,
        "train.method": "lora",
        "lora.rank": 4,
        "lora.alpha": 4.0,
        "optim.lr": 1e-4,
        "optim.lr_scheduler": "constant",
        "train.max_steps": 500,
        "train.batch_size": 1,
        "train.gradient_accumulation_steps": 4,
    },
    # sdxl-full: kohya's SDXL full fine-tune advice (train_SDXL-en.md): Adafactor with its own step
    # size off, constant_with_warmup, 100 warmup steps, learning_rate 4e-7 ("SDXL original learning
    # rate"); batch 1 and 1600 steps are sd-scripts' defaults (library/train_util.py). No preset we
    # know of from diffusers: its SDXL DreamBooth script trains LoRA only.
    "sdxl-full": {
        "data.resolution": 1024,
        "optim.optimizer": "adafactor",
        "optim.lr": 4e-7,
        "optim.lr_scheduler": "constant_with_warmup",
        "optim.warmup_steps": 100,
        "train.max_steps": 1600,
        "train.batch_size": 1,
    },
    # DeepFloyd IF (model.family if / if-ii): the four recipes of diffusers' DreamBooth guide
    # (../shared/seeds/003_*.txt, "DeepFloyd IF"). All use T5 embeddings computed once (the text
    # encoder frozen), and the seed's tip to validate with DDPM. Stage I trains at 64 px, stage II
    # (the upscaler) at 256 px. Stage I LoRA: lr 5e-6 with --scale_lr, which multiplies it by the
    # batch (4) on one GPU, so 2e-5 here; 1200 steps. Stage I full: "a very low learning rate" 1e-7,
    # batch 4, 150 steps, 8-bit Adam, the text encoder not saved (--skip_save_text_encoder).
    # Stage II LoRA: lr 1e-6, batch 4, 2000 steps. Stage II full: lr 5e-6, batch 2 x 6, 2000 steps.
    # The seed's memory figures: stage I LoRA ~28 GB, stage I full ~48 GB with 8-bit Adam at batch 4.
    # Ours keep T5-XXL (4.8 B weights) off the GPU once the prompts' embeddings are cached (and stored
    # in OUTPUT/cache with their provenance), which the seed's --pre_compute_text_embeddings does too.
    "if-i-lora": {
        "memory.offload_text_encoders": True,  # T5-XXL's embeddings cached once; the encoder stays off the GPU
        "data.resolution": 64,
        "train.method": "lora",
        "optim.lr": 2e-5,
        "train.batch_size": 4,
        "train.max_steps": 1200,
        "validation.scheduler": "ddpm",
    },
    "if-i-full": {
        "memory.offload_text_encoders": True,  # T5-XXL's embeddings cached once; the encoder stays off the GPU
        "data.resolution": 64,
        "optim.lr": 1e-7,
        "optim.optimizer": "adamw8bit",
        "train.batch_size": 4,
        "train.max_steps": 150,
        "export.save_text_encoder": False,
        "validation.scheduler": "ddpm",
    },
    "if-ii-lora": {
        "memory.offload_text_encoders": True,  # T5-XXL's embeddings cached once; the encoder stays off the GPU
        "data.resolution": 256,
        "train.method": "lora",
        "optim.lr": 1e-6,
        "train.batch_size": 4,
        "train.max_steps": 2000,
        "validation.scheduler": "ddpm",
    },
    "if-ii-full": {
        "memory.offload_text_encoders": True,  # T5-XXL's embeddings cached once; the encoder stays off the GPU
        "data.resolution": 256,
        "optim.lr": 5e-6,
        "train.batch_size": 2,
        "train.gradient_accumulation_steps": 6,
        "train.max_steps": 2000,
        "validation.scheduler": "ddpm",
    },
    # Speed and memory presets (issue 4). Measured costs: bench/RESULTS.md. Both also run on a CPU;
    # settings that only pay off on a GPU are left for the user to add there (see each note).
    #
    # fast: the most steps/s on a large GPU. The UNet is compiled (torch.compile; the first steps
    # pay the compile time) and kept in channels_last, the layout tensor-core convolutions want.
    # Latent and text-embedding caching, SDPA attention and the fused AdamW kernel are on by
    # default already. On a GPU also add memory.mixed_precision=bf16 (on a CPU without bf16 matrix
    # units it is slower), and memory.attention=xformers if xFormers is installed.
    # Measured on CPU (1 thread, tiny / small): 1.08x / 0.95x the default's steps/s once compiled,
    # after a first step of 4-70 s (warm to cold compile cache); GPU figures need a lent GPU.
    "fast": {
        "memory.compile_unet": True,
        "memory.channels_last": True,
    },
    # low-memory: the smallest peak without CPU offload. Gradient checkpointing keeps only block
    # boundaries' activations; the optimizer steps inside backward so that one parameter's
    # gradient lives at a time (which rules out global-norm clipping and gradient accumulation);
    # the trained weights are stored in bf16 and updated in fp32 with stochastic rounding, and
    # AdamW's two moments in 8 bits (bitsandbytes' blockwise quantization, as its AdamW8bit):
    # 2 + 2 bytes per weight instead of 4 + 8, computed under bf16 autocast. Below this: DeepSpeed
    # ZeRO-2 with CPU offload through accelerate.
    # The loss curve stays within 2% of fp32 AdamW's (tests/test_speed_modes.py). By arithmetic,
    # SD 1.5's UNet + text encoder weights, gradients and moments fall from 15.7 GB to 4.0 GB.
    # Measured on CPU for the whole R15 step (512 px, text encoder trained, prior preservation):
    # peak RSS 16.3 GiB (fp32 with checkpointing) -> 8.2 GiB with bf16 moments -> 6.5 GiB with 8-bit
    # moments, imports included (bench/RESULTS.md); the GPU's max_memory_allocated needs a lent GPU.
    "low-memory": {
        "memory.gradient_checkpointing": True,
        "memory.mixed_precision": "bf16",
        "memory.weights_dtype": "bf16",
        "optim.moments_dtype": "int8",
        "optim.fused_backward": True,
        "optim.max_grad_norm": None,
    },
}

# Sampling presets for `dreambooth sample --preset`. "overfit": the blog found that when a model
# overfits, "DDIM usually works much better than PNDM and LMSDiscrete" and "100 [inference
# steps] seems to be a good choice".
SAMPLE_PRESETS: dict[str, dict[str, object]] = {
    "default": {"scheduler": "dpm++", "num_inference_steps": 25},
    "overfit": {"scheduler": "ddim", "num_inference_steps": 100},
}
