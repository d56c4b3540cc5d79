"""Recipes that pretrain the miniature world's models from scratch: VAE, classifier, base.

    python scripts/miniworld_pretrain.py --stage vae --minutes 12
    python scripts/miniworld_pretrain.py --stage classifier --minutes 6
    python scripts/miniworld_pretrain.py --stage base --minutes 40

Each stage is deterministic given its seed and its number of steps. With `--minutes` and no
`--steps`, a stage times its first steps and sets its step count so that it ends in the budget;
the step count it used is written to `src/dreambooth/miniworld/assets/recipe.json`, and `--steps N` replays it
exactly (on the same hardware and torch version).

All three are real diffusers/transformers classes, so the result in `src/dreambooth/miniworld/assets/base` is an
ordinary `StableDiffusionPipeline` folder that `dreambooth train` fine-tunes like SD 1.5:

- VAE: `AutoencoderKL` (16, 32, 64), 4 latent channels, 32x32x3 -> 8x8x4, trained on 60% world
  and 40% generic procedural images so it can represent subjects the base never saw.
- Classifier: a small CNN with heads shape / colour-or-pattern / background / which-subject,
  trained on fresh renders, half of them passed through the VAE (so it accepts decoder blur).
- Base: `CLIPTextModel` (hidden 64, 3 layers, 16 positions, the real 49,408-token CLIP BPE
  tokenizer) and `UNet2DConditionModel` (sample 8, (64, 128), cross-attention 64) trained jointly
  on cached latents, DDPM scaled_linear epsilon objective, EMA weights saved.

Weights are stored as fp16 safetensors to keep the repository small; diffusers and
transformers load them into float32 models, which is what training and evaluation use.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import world

ASSETS = Path(__file__).resolve().parent / "assets"  # package data: a wheel install has them too
RECIPE_LOG = "recipe.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------

def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, 32, 32) float32 in [-1, 1]."""
    return torch.from_numpy(np.stack([world.to_array(im) for im in images]))


def plan_steps(step_fn: Callable[[int], None], steps: Optional[int], minutes: Optional[float], probe: int = 20) -> int:
    """Run `probe` steps and return the total step count: `steps`, or what fits in `minutes`."""
    t0 = time.time()
    for i in range(probe):
        step_fn(i)
    per_step = (time.time() - t0) / probe
    if steps is None:
        if minutes is None:
            raise ValueError("give --steps or --minutes")
        steps = max(probe + 1, int(minutes * 60 / per_step))
    log(f"{per_step:.3f} s/step -> {steps} steps (~{steps * per_step / 60:.1f} min)")
    return steps


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_fp16(folder: Path) -> None:
    """Rewrite every safetensors file under `folder` with fp16 tensors (loaders upcast to fp32)."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(path)
        save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in tensors.items()}, path,
                  metadata={"format": "pt"})


def record(stage: str, info: dict) -> None:
    """Add a stage's settings and timings to src/dreambooth/miniworld/assets/recipe.json."""
    path = ASSETS / RECIPE_LOG
    data = json.loads(path.read_text()) if path.exists() else {}
    data[stage] = info
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------

@dataclass
class VAERecipe:
    seed: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    pool: int = 20_000  # fixed pool of training images, rendered once
    kl_weight: float = 1e-6
    l1_weight: float = 0.5


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.SIZE,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def vae_pool(n: int) -> torch.Tensor:
    """Training images for the VAE: 3 in 5 from the world, 2 in 5 generic."""
    images = [world.world_example(i)[0] if i % 5 < 3 else world.generic_image(i) for i in range(n)]
    return images_to_tensor(images)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


@torch.no_grad()
def vae_report(vae) -> dict:
    """Reconstruction PSNR on held-out world images and on each subject's instance images."""
    vae.eval()
    report = {}
    test = images_to_tensor([world.world_example(10_000_000 + i)[0] for i in range(256)])
    report["world_psnr"] = psnr(vae(test).sample, test)
    for name in world.SUBJECTS:
        x = images_to_tensor(world.instance_images(name))
        report[f"{name}_psnr"] = psnr(vae(x).sample, x)
    return report


def train_vae(out_dir: Path, minutes: Optional[float] = 12, steps: Optional[int] = None, recipe: VAERecipe = VAERecipe()) -> dict:
    """Train the autoencoder; save it as a diffusers AutoencoderKL folder at `out_dir`."""
    t_start = time.time()
    torch.manual_seed(recipe.seed)
    vae = build_vae()
    log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters; rendering {recipe.pool} images")
    data = vae_pool(recipe.pool)  # (P, 3, 32, 32)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    total = [10 ** 9]

    def step(i: int) -> float:
        for g in opt.param_groups:
            g["lr"] = lr_at(i, total[0], recipe.lr, recipe.warmup)
        x = data[torch.randint(len(data), (recipe.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + recipe.l1_weight * F.l1_loss(recon, x) + recipe.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    t0 = time.time()
    probe = 20
    total[0] = plan_steps(step, steps, minutes, probe)
    for i in range(probe, total[0]):
        loss = step(i)
        if i % 250 == 0:
            log(f"vae step {i}/{total[0]} loss {loss:.4f}")
    train_seconds = time.time() - t0

    # scaling_factor = 1 / std of the latents (SD's 0.18215 was found the same way)
    vae.eval()
    with torch.no_grad():
        sample = images_to_tensor([world.world_example(20_000_000 + i)[0] for i in range(512)])
        std = vae.encode(sample).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    report = vae_report(vae)
    vae.save_pretrained(out_dir)
    save_fp16(out_dir)
    info = {"recipe": asdict(recipe), "steps": total[0], "train_seconds": round(train_seconds), "total_seconds": round(time.time() - t_start),
            "scaling_factor": 1.0 / std, **{k: round(v, 2) for k, v in report.items()}, "torch": torch.__version__}
    log(f"VAE done: {info}")
    return info


def load_vae(folder: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder)
    return vae.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------
# classifier
# ---------------------------------------------------------------------------------------

@dataclass
class ClassifierRecipe:
    seed: int = 0
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    width: int = 32
    vae_share: float = 0.5  # share of each batch passed through the VAE


def random_scene(rng: np.random.Generator) -> world.Scene:
    """Classifier training scene: 40% world, 30% subjects, 30% mixed attributes (e.g. a red heart)."""
    u = rng.random()
    if u < 0.4:
        return world.sample_scene(rng)
    bg = str(rng.choice(world.ALL_BACKGROUNDS))
    if u < 0.7:
        return world.subject_scene(world.SUBJECTS[str(rng.choice(list(world.SUBJECTS)))], bg, rng)
    shape, colour = str(rng.choice(world.ALL_SHAPES)), str(rng.choice(world.ALL_COLOURS))
    if colour == bg:
        colour = str(rng.choice([c for c in world.ALL_COLOURS if c != bg]))
    return world.Scene(shape, colour, bg, **world._pose(rng))


def classifier_batch(seed: int, step: int, n: int, vae, vae_share: float, augment: bool = True):
    """Fresh renders, a share passed through the VAE, with blur / noise / brightness augmentation."""
    rng = np.random.default_rng([seed, step, 4])
    scenes = [random_scene(rng) for _ in range(n)]
    x = images_to_tensor([world.render(s) for s in scenes])
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    k = int(n * vae_share)
    if k:
        with torch.no_grad():
            dist = vae.encode(x[:k]).latent_dist
            x[:k] = vae.decode(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)).sample.clamp(-1, 1)
    if augment:
        blur = torch.rand(n, 1, 1, 1, generator=gen) < 0.3
        x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
        x = x + 0.06 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
        x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    labels = {h: torch.tensor([s.labels()[h] for s in scenes]) for h in ("shape", "colour", "background", "subject")}
    return x.clamp(-1, 1), labels


def classifier_accuracy(model, vae, seed: int = 99, n: int = 1024) -> dict[str, float]:
    """Per-head accuracy on fresh renders (half through the VAE), never seen in training."""
    x, labels = classifier_batch(seed, 10**6, n, vae, 0.5, augment=False)
    pred = model.predict(x)
    return {h: float(np.mean([model.labels[h].index(p) == t for p, t in zip(pred[h], labels[h].tolist())])) for h in labels}


def train_classifier(out_dir: Path, vae_dir: Path = ASSETS / "base" / "vae", minutes: Optional[float] = 6,
                     steps: Optional[int] = None, recipe: ClassifierRecipe = ClassifierRecipe()) -> dict:
    """Train the attribute classifier on fresh renders; save it to `out_dir`."""
    from .classifier import AttributeClassifier

    t_start = time.time()
    vae = load_vae(vae_dir)
    torch.manual_seed(recipe.seed)
    model = AttributeClassifier(recipe.width)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    total = [10 ** 9]

    def step(i: int) -> float:
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(i, total[0], recipe.lr, recipe.warmup)
        x, labels = classifier_batch(recipe.seed, i, recipe.batch_size, vae, recipe.vae_share)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[h], labels[h]) for h in labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    t0 = time.time()
    total[0] = plan_steps(step, steps, minutes)
    for i in range(20, total[0]):
        loss = step(i)
        if i % 200 == 0:
            log(f"classifier step {i}/{total[0]} loss {loss:.4f}")
    train_seconds = time.time() - t0
    model.eval()
    model.save(out_dir)
    from .classifier import load_classifier

    acc = classifier_accuracy(load_classifier(out_dir), vae)  # measured on the saved (fp16) weights
    info = {"recipe": asdict(recipe), "steps": total[0], "train_seconds": round(train_seconds),
            "total_seconds": round(time.time() - t_start), "heldout_accuracy": acc, "torch": torch.__version__}
    log(f"classifier done: {info}")
    return info


# ---------------------------------------------------------------------------------------
# base model: text encoder + UNet, trained jointly from scratch
# ---------------------------------------------------------------------------------------

MAX_TOKENS = 16  # the longest caption is 13 tokens with <start> and <end>


@dataclass
class BaseRecipe:
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    pool: int = 40_000  # world examples, encoded by the VAE once (latent caching)
    text_hidden: int = 64
    text_layers: int = 3
    family: str = "sd"  # "sdxl": a second, projected text encoder, pooled embedding and size/crop time ids
    text_hidden_2: int = 0  # SDXL: the second encoder's width (OpenCLIP bigG's role), also the pooled width
    time_dim: int = 0  # SDXL: addition_time_embed_dim, per size/crop number
    unet_channels: tuple[int, ...] = (64, 128)  # block_out_channels of the UNet


# The miniature SDXL base: the same world, VAE and tokenizer files as the SD base; two narrower
# text encoders (their 49,408-row embeddings dominate the size) so that it stays under 15 MB.
SDXL_BASE = BaseRecipe(family="sdxl", text_hidden=24, text_hidden_2=32, time_dim=8)

# The miniature DeepFloyd IF stage I base: pixel space (no VAE: the UNet denoises the 32 x 32 image
# itself), a T5 v1.1-style encoder over a small unigram vocabulary of the world's words
# (scripts/make_t5_tokenizer.py --miniworld), and IF's UNet layout: plain resnets at 32 px, text
# as added keys/values in the attention of the 16 and 8 px levels, an attention-pooled text
# embedding added to the time embedding, 6 output channels (noise and variance). Trained on the
# noise half only (L_simple), so its scheduler samples with a fixed variance.
IF_BASE = BaseRecipe(family="if", text_hidden=64, text_layers=3, unet_channels=(16, 32, 64))


def build_text_encoder(tokenizer, recipe: BaseRecipe, hidden: int | None = None, projected: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden = hidden or recipe.text_hidden
    return (CLIPTextModelWithProjection if projected else CLIPTextModel)(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=recipe.text_layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_t5_encoder(tokenizer, recipe: BaseRecipe):
    """A T5 v1.1-style encoder (gated-GELU feed-forward, relative positions), as IF's T5-XXL in miniature."""
    from transformers import T5Config, T5EncoderModel

    hidden = recipe.text_hidden
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=hidden, num_layers=recipe.text_layers, num_heads=4, d_kv=hidden // 4,
        d_ff=2 * hidden, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))


def build_if_unet(recipe: BaseRecipe):
    """IF stage I's UNet layout (tiny.IF_ARCHITECTURES) at 32 px: 3 channels in, noise + variance out."""
    from diffusers import UNet2DConditionModel

    from ..tiny import _if_unet

    top = recipe.unet_channels[-1]
    return UNet2DConditionModel(sample_size=world.SIZE, in_channels=3, out_channels=6, norm_num_groups=16,
                                **_if_unet(recipe.unet_channels, 1, top, recipe.text_hidden, 16, 4))


def build_if_scheduler():
    """IF's noise schedule (cosine betas, dynamic thresholding at the 95th percentile, clipping at 1.5), with a
    fixed variance: the miniature base never trained its variance half."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         variance_type="fixed_small", thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5)


def build_unet(recipe: BaseRecipe):
    from diffusers import UNet2DConditionModel

    if recipe.family == "if":
        return build_if_unet(recipe)
    sdxl = {} if recipe.family == "sd" else dict(
        addition_embed_type="text_time", addition_time_embed_dim=recipe.time_dim,
        projection_class_embeddings_input_dim=6 * recipe.time_dim + recipe.text_hidden_2)
    return UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, block_out_channels=recipe.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=recipe.text_hidden + recipe.text_hidden_2, attention_head_dim=4, norm_num_groups=16, **sdxl,
    )


def build_scheduler():
    """Stable Diffusion's noise schedule; DDIM is the folder's sampler (25 steps work well here)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def write_tokenizer(src: Path, dst: Path, pad_token: str = "<|endoftext|>") -> None:
    """Copy a CLIP tokenizer folder (vocab.json, merges.txt) with model_max_length = MAX_TOKENS.

    pad_token: SDXL's second tokenizer pads with "!" instead of the end token."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def encode_pool(vae, n: int, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[world.Scene]]:
    """Render and VAE-encode world examples 0..n-1: posterior mean and std (n, 4, 8, 8), scenes.

    Without a VAE (pixel space) the mean is the image itself (n, 3, 32, 32) and the std zero."""
    means, stds, scenes = [], [], []
    for i in range(0, n, batch):
        ex = [world.world_example(s) for s in range(i, min(n, i + batch))]
        pixels = images_to_tensor([e[0] for e in ex])
        if vae is None:
            means.append(pixels)
            stds.append(torch.zeros_like(pixels))
        else:
            dist = vae.encode(pixels).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        scenes += [e[2] for e in ex]
    return torch.cat(means), torch.cat(stds), scenes


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_base(out_dir: Path, tokenizer_dir: Optional[Path] = None, minutes: Optional[float] = 40, steps: Optional[int] = None,
               recipe: BaseRecipe = BaseRecipe(), vae_dir: Optional[Path] = None) -> dict:
    """Pretrain the text encoder(s) + UNet on the world; write a pipeline folder of `recipe.family` to `out_dir`.

    The VAE comes from `vae_dir` (default `out_dir/vae`, made by stage `vae`). The tokenizer comes
    from `tokenizer_dir` (scripts/make_clip_tokenizer.py output) or, when omitted, `out_dir/tokenizer`.
    Prompts become conditioning through the trainer's own model family (`encode_prompt`,
    `conditioning`, `predict`), so the base is trained exactly as DreamBooth will fine-tune it.
    """
    import copy
    from types import SimpleNamespace

    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from ..models.family import Components
    from ..models.load import FAMILIES

    t_start = time.time()
    out_dir = Path(out_dir)
    family = FAMILIES[recipe.family]
    pixel_space = recipe.family == "if"  # no VAE: the UNet denoises the image itself
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else out_dir / "tokenizer"
    tmp_tok = out_dir.parent / f".tokenizer-staging-{recipe.family}"
    tokenizers = {}
    if pixel_space:
        from transformers import T5Tokenizer

        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no T5 tokenizer at {tokenizer_dir}; make one with "
                                    "scripts/make_t5_tokenizer.py --miniworld DIR and pass --tokenizer DIR")
        tokenizers["tokenizer"] = T5Tokenizer.from_pretrained(tokenizer_dir)
    else:
        if not (tokenizer_dir / "vocab.json").is_file():
            raise FileNotFoundError(f"no CLIP tokenizer at {tokenizer_dir}; make one with scripts/make_clip_tokenizer.py "
                                    "from open-clip-torch's bpe_simple_vocab_16e6.txt.gz and pass --tokenizer")
        for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))[:len(family.text_encoders)]:
            write_tokenizer(tokenizer_dir, tmp_tok / name, pad_token=pad)
            tokenizers[name] = CLIPTokenizer.from_pretrained(tmp_tok / name)
    vae = None if pixel_space else load_vae(Path(vae_dir) if vae_dir else out_dir / "vae")

    log(f"rendering {recipe.pool} world examples" + ("" if pixel_space else " and encoding them with the VAE"))
    mean, std, scenes = encode_pool(vae, recipe.pool)  # (P, 4, 8, 8) each; pixel space (P, 3, 32, 32)
    scale = 1.0 if pixel_space else vae.config.scaling_factor

    torch.manual_seed(recipe.seed)
    if pixel_space:
        text_encoders = {"text_encoder": build_t5_encoder(tokenizers["tokenizer"], recipe)}
    else:
        text_encoders = {"text_encoder": build_text_encoder(tokenizers["tokenizer"], recipe)}
    if "text_encoder_2" in family.text_encoders:
        text_encoders["text_encoder_2"] = build_text_encoder(tokenizers["tokenizer_2"], recipe, recipe.text_hidden_2, projected=True)
    torch.manual_seed(recipe.seed)
    unet = build_unet(recipe)
    folder_scheduler = build_if_scheduler() if pixel_space else build_scheduler()
    vae_part = {} if vae is None else {"vae": vae}
    comps = Components(out_dir, family, {"unet": unet, **vae_part, **text_encoders}, tokenizers, None, folder_scheduler)
    ema = {name: copy.deepcopy(m).requires_grad_(False) for name, m in {"unet": unet, **text_encoders}.items()}
    log(f"{family.name} base: " + ", ".join(f"{name} {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"
                                           for name, m in {"unet": unet, **text_encoders}.items()) + " parameters")
    noise_scheduler = DDPMScheduler.from_config(folder_scheduler.config)
    trained = [unet, *text_encoders.values()]
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = [10 ** 9]
    losses: list[float] = []
    size = (world.SIZE, world.SIZE)
    geometry = SimpleNamespace(original_sizes=[size] * recipe.batch_size, crops=[(0, 0)] * recipe.batch_size,
                               target_size=size)  # world images are whole, uncropped 32 x 32 renders

    def step(i: int) -> float:
        for m in trained:
            m.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(i, total[0], recipe.lr, recipe.warmup)
        rng = np.random.default_rng([recipe.seed, i, 5])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        idx = torch.from_numpy(rng.integers(len(scenes), size=recipe.batch_size))
        captions = [world.caption(scenes[j], rng) for j in idx.tolist()]  # a fresh caption draw every time
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale  # (B, 4, 8, 8)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        cond = family.conditioning(comps, family.encode_prompt(comps, captions), geometry, latents, gen)
        pred = family.predict(comps, noisy, t, cond)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for name, module in {"unet": unet, **text_encoders}.items():
            _ema_update(ema[name], module, recipe.ema_decay if i >= recipe.warmup else 0.0)
        losses.append(loss.item())
        return losses[-1]

    t0 = time.time()
    total[0] = plan_steps(step, steps, minutes)
    for i in range(20, total[0]):
        step(i)
        if i % 200 == 0:
            log(f"base step {i}/{total[0]} loss (mean of last 200) {np.mean(losses[-200:]):.4f}")
    train_seconds = time.time() - t0

    comps.modules.update({name: m.eval() for name, m in ema.items()})
    family.pipeline(comps, scheduler=folder_scheduler).save_pretrained(out_dir)
    index = json.loads((out_dir / "model_index.json").read_text())
    if "force_zeros_for_empty_prompt" in index:
        # SDXL's pipeline replaces the negative prompt "" by zeros, as SDXL was trained; this base
        # learned the unconditional case from empty captions (world.caption), so it encodes "".
        index["force_zeros_for_empty_prompt"] = False
        (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    import shutil

    if not pixel_space:
        for name in tokenizers:  # only vocab.json + merges.txt + config, as SD ships it
            shutil.rmtree(out_dir / name)
            write_tokenizer(tmp_tok / name, out_dir / name, pad_token=tokenizers[name].pad_token)
        shutil.rmtree(tmp_tok)
        vae_config = out_dir / "vae" / "config.json"  # drop the machine-specific path from_pretrained recorded
        vae_config.write_text(json.dumps({k: v for k, v in json.loads(vae_config.read_text()).items() if k != "_name_or_path"},
                                         indent=2, sort_keys=True) + "\n")
    save_fp16(out_dir)
    info = {"recipe": asdict(recipe), "steps": total[0], "train_seconds": round(train_seconds),
            "total_seconds": round(time.time() - t_start), "final_loss": round(float(np.mean(losses[-200:])), 4),
            "torch": torch.__version__}
    log(f"base done: {info}")
    return info


def share_files(folder: Path, source: Path, names: dict[str, str]) -> None:
    """Replace files of `folder` by relative symlinks to identical files of `source` ({copy: original}).

    The miniature SDXL base shares the SD base's VAE and tokenizer files this way: git stores a
    link, and a wheel (which cannot hold links) stores the bytes once more.
    """
    import os

    for name, source_name in names.items():
        copy, original = folder / name, source / source_name
        if copy.read_bytes() != original.read_bytes():
            raise ValueError(f"{copy} differs from {original}; only identical files can be shared")
        copy.unlink()
        copy.symlink_to(os.path.relpath(original, copy.parent))
