"""The model-family seam: everything that differs between Stable Diffusion 1.x/2.x, SDXL and
DeepFloyd IF lives behind `ModelFamily`, so the loop (`train.py`), the objective and the exporter
never branch on a family (k-diffusion's `external.py` wrappers are the pattern: the wrapper knows
the model, the loss knows only `predict`).

A family is a plain object that follows the `ModelFamily` Protocol; there is no base class to
inherit from (torchtune's rule). One module per family: `sd.py`, `sdxl.py`, `deepfloyd_if.py`. A family owns:

- the folder: which parts it must have (`parts`), its pipeline class names, and `load` into
  `Components`, a mapping of named modules in which a module may be absent (IF has no VAE);
- what can train: `denoiser` and `text_encoders` name the modules; `trainable.py` makes them full
  or LoRA, each text encoder with its own config section (learning rate, stop step);
- `encode_prompt`: tokenizers, attention masks, pooled outputs -> per-prompt tensors (cacheable);
- `encode_images` / `latents_from`: pixels -> the denoiser's input space; `resolution_step` (pixels
  per latent x the denoiser's patch size) drives every resolution check and the bucket sides;
- `conditioning`: text tensors plus per-image facts (SDXL's original size and crop, IF stage II's
  low-resolution image and noise level) -> the denoiser's keyword arguments;
- `predict(comps, noisy, timesteps, cond)`: the denoiser's output in the objective's target space
  (IF stage I keeps the epsilon half of its learned-variance output);
- `pipeline`: the diffusers pipeline for validation and sampling over the training modules;
- `save_lora`, `usage` (the model card's snippet) and what `export` writes;
- `schedule(model_dir)`: the training noise schedule (`schedule.py`: DDPM, or rectified flow), built
  from the folder's scheduler config before any weight loads; `objective.py`, the drift probe and
  the model prior ask it for timesteps, noisy inputs, targets and weights, and validation, class
  images and `sample` for their samplers.

A flow-matching transformer family (SD3, Flux) fits without a change to the loop, the objective or
the exporter; tests/flow_family.py is one (a tiny SD3):
- its denoiser is a transformer: `denoiser = "transformer"`, and `predict` calls it with its own
  keyword names (`hidden_states`, `encoder_hidden_states`, `pooled_projections`, `timestep`);
- its text encoders (two CLIP, one T5) are `text_encoders`; `encode_prompt` returns the joint
  sequence and the pooled vector, as SDXL's does;
- its schedule is a `FlowMatchSchedule` (x_t = (1 - s) x0 + s eps, target eps - x0; the timestep
  density, loss weighting and shift are `objective` settings);
- its VAE has a shift as well as a scale, which `latents_from` applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ..schedule import NoiseSchedule


@dataclass
class Components:
    """The loaded parts of a model: named modules (a family may lack any but its denoiser)."""

    model_dir: Path
    family: "ModelFamily"
    modules: dict[str, torch.nn.Module]  # e.g. unet, vae, text_encoder, text_encoder_2
    tokenizers: dict[str, Any]  # e.g. tokenizer, tokenizer_2
    schedule: "NoiseSchedule"  # the training noise schedule (`ModelFamily.schedule`)
    inference_scheduler: Any  # the folder's own sampler, kept for export and validation
    keep_fp32: set[str] = field(default_factory=set)  # frozen modules never cast to the autocast dtype
    extras: dict[str, Any] = field(default_factory=dict)  # what else a family loads (IF stage II's noising schedule)
    sources: dict[str, Path] = field(default_factory=dict)  # module -> its folder, where not model_dir / name

    def source(self, name: str) -> Path:
        """The folder a module was loaded from (model.vae_path for a replaced VAE)."""
        return self.sources.get(name, self.model_dir / name)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.modules[self.family.denoiser]

    def __getattr__(self, name: str):
        # Read access by folder name (comps.unet, comps.vae, comps.tokenizer_2); code that
        # replaces a module (accelerate's wrappers) assigns through `modules`.
        for parts in (self.__dict__.get("modules", {}), self.__dict__.get("tokenizers", {})):
            if name in parts:
                return parts[name]
        raise AttributeError(f"{type(self).__name__} has no module or tokenizer {name!r}")


class ModelFamily(Protocol):
    name: str  # model.family value
    hub_tag: str  # the model card's tag (stable-diffusion, stable-diffusion-xl)
    pipeline_class_names: tuple[str, ...]  # model_index.json _class_name values it recognises
    parts: tuple[str, ...]  # sub-folders a model folder must have
    denoiser: str  # module name of the network the objective trains
    text_encoders: tuple[str, ...]  # module names; config sections of the same names train them
    lora_targets: dict[str, tuple[str, ...]]  # module name -> its Linear layers that get adapters by default
    refuses: dict[str, str]  # "section.field=value" -> why this family cannot train with it
    single_file: dict[str, str] | None  # part -> key prefix in the one-file layout A1111/ComfyUI read; None: no such layout
    trains_with_identifier: bool  # False: prompts lose concept.identifier (an upscaler learns the look, not the name)
    buckets_by_default: bool  # data.buckets when unset (optional: a family that omits it trains unbucketed)
    # whether a LoRA output can carry the identifier's trained embedding (text_encoder.scope=identifier) as a
    # textual-inversion file that diffusers loads back into this family's pipeline exactly as trained (optional: no)
    identifier_embedding_file: bool
    single_file_tables: dict[str, str] | None  # part -> the `interop.layout` table that lays it out (unet | vae | text)
    single_file_configs: tuple[str, ...]  # shipped configs (assets/single_file) of its public base models, in order
    kohya_prefixes: dict[str, str] | None  # module -> key prefix of its adapters in kohya's LoRA format; None: none

    def latent_factor(self, model_dir: Path) -> int:
        """Pixels per latent along each side, read from the folder's configs (no weights loaded)."""

    def resolution_step(self, model_dir: Path) -> int:
        """Image sides must be multiples of this: the latent factor x the denoiser's patch size (1 for a UNet,
        which takes every latent pixel; 2 for a transformer that packs 2x2 latents into one token)."""

    def probe_inputs(self, module_name: str, config, generator: torch.Generator) -> dict[str, Any]:
        """Fixed-seed keyword arguments for one call of the module `module_name` built from `config` (export
        verification runs it on both copies, `interop.verify.compare`): the denoiser's forward, a text
        encoder's forward, any other part's `decode`. CPU tensors; the caller moves and casts them."""

    def render_inputs(self, pipe) -> dict[str, Any]:
        """The cheapest call of this family's pipeline `pipe` (loaded as a user loads it): the prompt (or its
        embeddings, where the pipeline has no text encoder), the smallest size, any input image; steps,
        seed and output type are the caller's (`interop.verify.renders`)."""

    def load(self, model_dir: Path, vae_path: str | None = None) -> Components:
        """Every part, frozen; training decides what to unfreeze."""

    def schedule(self, model_dir: Path) -> "NoiseSchedule":
        """The training noise schedule, from the folder's scheduler config (no weights loaded)."""

    def encode_prompt(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> per-prompt text tensors, first dimension N (what the text cache stores)."""

    def encode_images(self, comps: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (N, 3, H, W) in [-1, 1] -> the input-space distribution's mean and std."""

    def latents_from(self, comps: Components, mean: torch.Tensor, std: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
        """A sample of that distribution, scaled to the denoiser's input space."""

    def conditioning(self, comps: Components, text: dict[str, torch.Tensor], batch, x0: torch.Tensor,
                     generator: torch.Generator) -> dict[str, Any]:
        """Text tensors + per-image facts -> the denoiser's keyword arguments.

        `batch` carries each image's geometry (original size, crop); `x0` is the clean input the
        loss noises (an upscaler conditions on a degraded copy of it); `generator` is the step's
        noise stream, for any noise the conditioning itself draws (IF stage II's augmentation).
        """

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The denoiser's prediction, in the space of its schedule's `target`."""

    def pipeline(self, comps: Components, scheduler=None):
        """A diffusers pipeline over the (possibly training) modules."""

    def sample_inputs(self, comps: Components, photos: list, n: int) -> dict[str, list]:
        """Per-image pipeline arguments besides the prompt for `n` validation images (an upscaler's low-res input)."""

    def prompt_kwargs(self, comps: Components, positive: dict, negative: dict, no_negative_prompt: bool) -> dict:
        """encode_prompt's tensors for prompts and negative prompts -> the pipeline's *_embeds arguments."""

    def save_lora(self, comps: Components, folder: Path, trained: set[str], weight_name: str) -> None:
        """Write the adapters of the `trained` modules in diffusers' LoRA format."""

    def usage(self, model: str, base: str, lora: bool) -> list[str]:
        """Python lines that load the exported model, for the model card."""


def load_part(name: str, where: Path, loader):
    """Run one part's loader; any failure becomes one line naming the part and its folder."""
    from ..errors import DreamBoothError

    try:
        return loader()
    except Exception as e:  # from_pretrained raises many types; the user needs the path and the part
        first = str(e).splitlines()[0] if str(e) else ""
        raise DreamBoothError(f"could not load the {name} from {where}: {type(e).__name__}: {first} "
                              "(is the folder complete and uncorrupted?)") from e


def own_scheduler(model_dir: Path):
    """The sampler the folder ships (e.g. PNDM for SD 1.5, Euler for SDXL), by its recorded class."""
    import json

    import diffusers

    config = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    return cls.from_pretrained(model_dir, subfolder="scheduler")


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (also through accelerate's wrappers, which have no `.device`)."""
    return next(module.parameters()).device
