"""`dreambooth evaluate --real`: the DreamBooth paper's metrics on a real model (DreamBench, section 4.1).

For a trained output (full or LoRA) and the subject's photos, with fixed seeds:

- DINO: mean cosine similarity between the DINO (ViT-S/16) CLS embeddings of every generated image
  of the subject prompts and every real photo. Subject fidelity; higher is better.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine similarity between each generated image's CLIP embedding and its prompt's
  CLIP text embedding, the prompt read without the identifier ("a sks dog in the jungle" is
  scored against "a dog in the jungle": the identifier means nothing to CLIP). Prompt fidelity.
- PRES (prior preservation): mean DINO similarity between images of the plain class prompt ("a
  dog") and the real photos. High means the class has collapsed onto the subject (language
  drift); lower is better.
- DIV (diversity): the paper averages LPIPS distances between images of the same prompt; LPIPS
  needs weights this package cannot download, so DIV here is 1 - the mean DINO similarity between
  distinct images of the same prompt, averaged over prompts. Higher is more diverse. It is not on
  LPIPS's scale: compare DIV values from this command with each other, not with the paper's.

The real photos against each other give the reference row the paper reports as "Real Images"
(the best DINO and CLIP-I a generator can expect). docs/metrics.md has the definitions, the
prompt lists and the paper's Table 1.

    dreambooth evaluate outputs/my_dog --real --dino ./dino-vits16 --clip ./clip-vit-large-patch14 --subject-type live
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import DreamBoothError
from .prompts import TEMPLATES


@dataclass
class RealEvalSettings:
    identifier: str  # the rare token, e.g. "sks"
    noun: str  # the class noun, e.g. "dog"
    templates: tuple[str, ...] = TEMPLATES["object"]  # prompts with {identifier} and {noun}
    class_prompt: str | None = None  # PRES's prompt; default "a {noun}"
    num_images: int = 4  # per prompt (the paper: 4); image i of every prompt uses seed + i
    class_images: int = 16  # class-prompt images for PRES (seeds seed .. seed + class_images - 1)
    seed: int = 0
    scheduler: str = "dpm++"
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    resolution: int | None = None  # None: the model's own
    batch_size: int = 4
    prompts: list[str] = field(init=False)  # the subject prompts, filled in

    def __post_init__(self):
        if not self.identifier or not self.noun:
            raise DreamBoothError("--identifier and --class-noun are needed (they are read from the output's "
                                  "config.yaml when it has one), e.g. --identifier sks --class-noun dog")
        if self.num_images < 2:
            raise DreamBoothError(f"--num-images must be at least 2 (DIV compares images of one prompt), got {self.num_images}")
        if self.class_images < 1:
            raise DreamBoothError(f"--class-images must be at least 1 (PRES needs class-prompt images), got {self.class_images}")
        try:
            self.prompts = [t.format(identifier=self.identifier, noun=self.noun) for t in self.templates]
        except (KeyError, IndexError) as e:
            raise DreamBoothError(f"a prompt template names an unknown field {e}; templates may use only "
                                  "{identifier} and {noun}, e.g. 'a {identifier} {noun} in the snow'") from None
        self.class_prompt = (self.class_prompt or "a {noun}").format(noun=self.noun)


def mean_cosine(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j) of unit-norm rows; with `b` None, over pairs i != j of `a`.

    a: (N, D), b: (M, D), both L2-normalised.
    """
    if b is not None:
        return float((a @ b.T).mean())
    n = len(a)
    if n < 2:
        raise ValueError("mean_cosine over distinct pairs needs at least two rows")
    sims = a @ a.T  # (N, N); the diagonal (each image with itself, 1.0) is left out
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def without_identifier(prompt: str, identifier: str) -> str:
    """'a sks dog in the jungle' -> 'a dog in the jungle' (CLIP-T's text)."""
    return " ".join(w for w in prompt.split() if w != identifier)


def score(gen_dino: torch.Tensor, gen_clip: torch.Tensor, text_clip: torch.Tensor, real_dino: torch.Tensor,
          real_clip: torch.Tensor, class_dino: torch.Tensor, per_prompt: int) -> dict:
    """The five metrics from embeddings (all L2-normalised rows).

    gen_*: (P * per_prompt, D), the subject prompts' images grouped by prompt; text_clip: (P, D), each prompt
    without the identifier; real_*: (R, D), the photos; class_dino: (C, D), the class prompt's images.
    """
    prompts = len(text_clip)
    prompt_of = torch.arange(prompts).repeat_interleave(per_prompt)  # (P * per_prompt,)
    groups = gen_dino.view(prompts, per_prompt, -1)
    return {
        "dino": mean_cosine(gen_dino, real_dino),
        "clip_i": mean_cosine(gen_clip, real_clip),
        "clip_t": float((gen_clip * text_clip[prompt_of]).sum(-1).mean()),
        "pres": mean_cosine(class_dino, real_dino),
        "div": 1.0 - sum(mean_cosine(g) for g in groups) / prompts,
    }


def real_reference(real_dino: torch.Tensor, real_clip: torch.Tensor) -> dict | None:
    """The photos against each other (distinct pairs): the paper's "Real Images" row. None for a single photo."""
    if len(real_dino) < 2:
        return None
    return {"dino": mean_cosine(real_dino), "clip_i": mean_cosine(real_clip)}


def defaults_from_output(model_dir: str | Path) -> dict:
    """Photos, identifier, class noun and class prompt of a `dreambooth train` output (its config.yaml), if any."""
    import yaml

    config = Path(model_dir) / "config.yaml"
    if not config.is_file():
        return {}
    cfg = yaml.safe_load(config.read_text()) or {}
    concept = cfg.get("concept") or {}
    if not concept.get("instance_dir") and cfg.get("concepts"):
        concept = cfg["concepts"][0]  # several concepts: the first (pass --photos/--identifier for another)
    prompt = (concept.get("instance_prompt") or "").split()  # "a photo of sks dog": identifier, then class noun
    return {"photos": concept.get("instance_dir") or None,
            "identifier": concept.get("identifier") or (prompt[-2] if len(prompt) >= 2 else None),
            "noun": prompt[-1] if prompt else None, "class_prompt": concept.get("class_prompt")}


def evaluate_real(model_dir: str | Path, photos_dir: str | Path, dino: str | Path, clip: str | Path,
                  settings: RealEvalSettings, lora_base: str | None = None, device: str = "cpu",
                  out_dir: str | Path | None = None) -> dict:
    """Render the prompts with `model_dir`, embed them and the photos, and score them (see the module docstring).

    The embedders are loaded (and their folders checked) before the pipeline, so a wrong --dino or --clip fails
    before any image is rendered. Writes `evaluation-real.json` and `evaluation-real.png` (rows: each prompt's
    images, the class prompt's last) to `out_dir` (default: `model_dir`).

    Returns:
        dict: {"model_dir", "photos", "settings", "metrics": {dino, clip_i, clip_t, pres, div}, "real_images",
        "per_prompt": [...], "seconds"}; JSON-serialisable.
    """
    from ..data.images import list_images, load_images
    from ..sampling import generate, image_grid, load_trained_pipeline
    from .embedders import ClipEmbedder, DinoEmbedder

    t0 = time.time()
    s = settings
    photos = load_images(list_images(photos_dir, "instance"), min_size=0)
    dino_model, clip_model = DinoEmbedder(dino, device), ClipEmbedder(clip, device)
    pipe = load_trained_pipeline(model_dir, base=lora_base, scheduler=s.scheduler, device=device)

    def render(prompts: list[str], seeds: list[int]):
        size = {"height": s.resolution, "width": s.resolution} if s.resolution else {}
        return generate(pipe, prompts, seeds, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                        batch_size=s.batch_size, progress=True, **size)

    gen = render([p for p in s.prompts for _ in range(s.num_images)],
                 [s.seed + i for _ in s.prompts for i in range(s.num_images)])
    cls = render([s.class_prompt] * s.class_images, [s.seed + i for i in range(s.class_images)])
    texts = [without_identifier(p, s.identifier) for p in s.prompts]
    gen_dino, gen_clip, text_clip = dino_model.embed(gen), clip_model.embed(gen), clip_model.embed_text(texts)
    real_dino, real_clip = dino_model.embed(photos), clip_model.embed(photos)
    class_dino = dino_model.embed(cls)
    per_prompt = []
    for k, (prompt, text) in enumerate(zip(s.prompts, texts)):
        rows = slice(k * s.num_images, (k + 1) * s.num_images)
        one = score(gen_dino[rows], gen_clip[rows], text_clip[k : k + 1], real_dino, real_clip, class_dino, s.num_images)
        per_prompt.append({"prompt": prompt, "clip_t_text": text, "dino": one["dino"], "clip_i": one["clip_i"],
                           "clip_t": one["clip_t"], "div": one["div"]})
    result = {"model_dir": str(model_dir), "photos": str(photos_dir), "num_photos": len(photos),
              "settings": {k: v for k, v in asdict(s).items()},
              "metrics": score(gen_dino, gen_clip, text_clip, real_dino, real_clip, class_dino, s.num_images),
              "real_images": real_reference(real_dino, real_clip), "per_prompt": per_prompt,
              "seconds": round(time.time() - t0, 1)}
    out_dir = Path(out_dir or model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation-real.json").write_text(json.dumps(result, indent=2) + "\n")
    cls_row = cls[: s.num_images] + [cls[0].copy() for _ in range(max(0, s.num_images - len(cls)))]
    image_grid(gen + cls_row, cols=s.num_images).save(out_dir / "evaluation-real.png")
    return result


def format_table(result: dict) -> str:
    """The metrics beside the real-photo reference, then DINO / CLIP-I / CLIP-T per prompt."""
    m, ref, s = result["metrics"], result["real_images"] or {}, result["settings"]
    lines = [f"{result['model_dir']}: {len(s['prompts'])} prompts x {s['num_images']} images, {s['class_images']} class "
             f"images ({s['scheduler']} {s['num_inference_steps']} steps, guidance {s['guidance_scale']}), "
             f"{result['num_photos']} photos",
             f"{'metric':<34}{'model':>8}{'photos':>8}", "-" * 50]
    names = {"dino": "DINO (subject fidelity)", "clip_i": "CLIP-I (subject fidelity)", "clip_t": "CLIP-T (prompt fidelity)",
             "pres": "PRES (class drift, lower=better)", "div": "DIV (1 - same-prompt DINO)"}
    for key, name in names.items():
        real = f"{ref[key]:.3f}" if key in ref else ""
        lines.append(f"{name:<34}{m[key]:>8.3f}{real:>8}")
    lines += ["", f"{'prompt':<60}{'DINO':>7}{'CLIP-I':>8}{'CLIP-T':>8}"]
    for row in result["per_prompt"]:
        lines.append(f"{row['prompt'][:59]:<60}{row['dino']:>7.3f}{row['clip_i']:>8.3f}{row['clip_t']:>8.3f}")
    return "\n".join(lines)
