"""Command line: `dreambooth train | class-images | sample | convert | demo | evaluate | identifier | doctor | ui`.

`train` and `class-images` take every `TrainConfig` field as a dotted flag (`--optim.lr 2e-6`),
generated from the dataclasses, so the flags, the YAML files and `--help` cannot drift apart.
Precedence, lowest first: defaults < --preset < --config FILE < flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from .config import SAMPLERS, TrainConfig, build_config, dotted_to_nested, iter_fields, load_yaml, type_name
from .errors import DreamBoothError
from .evaluation.prompts import TEMPLATES
from .presets import SAMPLE_PRESETS, TRAIN_PRESETS

TRAIN_EPILOG = """examples:
  dreambooth train --preset object --model.path ./stable-diffusion-v1-5 \\
      --concept.instance_dir ./dog --concept.instance_prompt "a photo of sks dog"
  dreambooth train --preset face --model.path ./sd15 --concept.instance_dir ./me \\
      --concept.instance_prompt "a photo of sks person" --concept.class_prompt "a photo of a person"
  dreambooth train --config configs/sd15_lora.yaml --train.max_steps 800
  dreambooth train --config run.yaml --train.resume        # continue from the latest checkpoint

presets (any flag overrides them):
""" + "\n".join(f"  {name:8s} " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in TRAIN_PRESETS.items())


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig leaf field, grouped by section, defaults suppressed (so we know what was given)."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with settings (same keys as the flags, nested).")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, tp, default, help_text in iter_fields(TrainConfig):
        section = key.split(".")[0] if "." in key else "general"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} settings")
        base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Union else tp
        # argparse %-formats help strings: escape our own percent signs.
        kwargs: dict = {"dest": key, "default": argparse.SUPPRESS, "help": f"{help_text} (default: {default!r})".replace("%", "%%"),
                        "metavar": "BOOL" if base is bool else type_name(tp) if typing.get_origin(base) is typing.Literal
                        else type_name(tp).upper()}
        if key == "concepts":
            continue  # a list of mappings: YAML only
        if base is bool:
            kwargs.update(nargs="?", const="true")
        elif typing.get_origin(base) is list:
            kwargs.update(nargs="+")
        groups[section].add_argument(f"--{key}", **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {k: (None if isinstance(v, str) and v.lower() in {"null", "none"} else v)
             for k, v in vars(args).items() if "." in k or k == "preset"}
    layers = [load_yaml(args.config)] if getattr(args, "config", None) else []
    layers.append(dotted_to_nested(flags))
    return build_config(*layers)


def cmd_train(args) -> None:
    cfg = config_from_args(args).validate()  # before the heavy imports below: a typo fails in a fraction of a second
    from .train import summary, train

    result = train(cfg)
    print(summary(result))


def cmd_class_images(args) -> None:
    cfg = config_from_args(args)
    cfg.prior.enabled = True
    from .data.dataset import subject_examples
    from .data.prior import ensure_concept_class_images
    from .plan import preflight

    checked = preflight(cfg)  # train's own checks: settings, packages, model folder, family, resolution
    concepts = cfg.resolved_concepts()
    # With buckets the class images are made at the bucket sizes of the subject photos, as train makes them.
    subject = subject_examples(concepts, cfg.data) if checked.buckets else []
    for concept in concepts:
        files = ensure_concept_class_images(cfg, concept, subject, checked.buckets, checked.model_dir, device=_device())
        prompts = concept.class_prompts or [concept.class_prompt]
        what = repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} class prompts ({prompts[0]!r}, ...)"
        print(f"{len(files)} class images for {what} in {concept.class_dir}")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def cmd_sample(args) -> None:
    from .sampling import generate, image_grid, load_trained_pipeline

    preset = SAMPLE_PRESETS[args.preset]
    scheduler = args.scheduler or preset["scheduler"]
    steps = args.steps or preset["num_inference_steps"]
    seeds = [args.seed + i for i in range(args.num_images)]
    out_dir = Path(args.out_dir or Path(args.model) / "generated")
    out_dir.mkdir(parents=True, exist_ok=True)
    # A cascade (DeepFloyd IF): each --upscale model takes the previous stage's images as its input.
    stages = [(args.model, args.prompt, {})] + [(path, args.upscale_prompt or args.prompt, None) for path in args.upscale]
    images = grid = None
    for i, (model, prompt, inputs) in enumerate(stages):
        pipe = load_trained_pipeline(model, base=args.base if i == 0 else None, scheduler=scheduler, device=_device())
        images = generate(pipe, [prompt] * args.num_images, seeds, num_inference_steps=steps,
                          guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                          height=args.resolution if i == 0 else None, width=args.resolution if i == 0 else None,
                          batch_size=args.batch_size, progress=True, inputs={"image": images} if i else inputs)
        grid = image_grid(images)
        if len(stages) > 1:
            grid.save(out_dir / f"{scheduler}-{steps}-stage{i + 1}-grid.png")
    for seed, image in zip(seeds, images):
        image.save(out_dir / f"{scheduler}-{steps}-seed{seed}.png")
    grid.save(out_dir / f"{scheduler}-{steps}-grid.png")
    chain = f" through {len(stages)} stages" if len(stages) > 1 else ""
    print(f"{len(images)} images ({scheduler}, {steps} steps, guidance {args.guidance_scale}){chain} written to {out_dir}")


def cmd_convert(args) -> None:
    from .interop.convert import convert

    report = convert(args.src, args.dst, config=args.config, precision=args.precision, allow_pickle=args.allow_pickle,
                     verify=not args.no_verify)
    if report.problems:
        raise DreamBoothError(f"{args.dst} was written but does not match {args.src}: {'; '.join(report.problems)}")
    print(f"wrote {args.dst}" + (f"; verified: {report.summary()}" if report.checks else ""))


def cmd_demo(args) -> None:
    from .miniworld.demo import demo, family_overrides
    from .miniworld.evaluate import BASES

    overrides = family_overrides(args.family, args.no_prior, args.lora, steps=args.steps)
    output_dir = args.output_dir or "outputs/miniworld-demo" + ("" if args.family == "sd" else f"-{args.family}")
    demo(output_dir, subject=args.subject, base_dir=BASES[args.family], overrides=overrides, n_eval=args.n, seed=args.seed)


def cmd_evaluate(args) -> None:
    import json

    if args.real:
        return cmd_evaluate_real(args)
    if not args.subject:
        raise DreamBoothError("--subject NAME is required for a miniature-world model (e.g. --subject banded_heart); "
                              "for a real model pass --real with --dino and --clip")
    from .miniworld.evaluate import base_of, evaluate, format_table

    result = evaluate(args.model, args.subject, base_dir=None if args.no_base else (args.base or base_of(args.model)),
                      n=args.n, seed=args.seed, lora_base=args.lora_base)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {args.json}")


def cmd_evaluate_real(args) -> None:
    from .evaluation.prompts import read_templates
    from .evaluation.real import RealEvalSettings, defaults_from_output, evaluate_real, format_table

    if not args.dino or not args.clip:
        raise DreamBoothError("--real needs both --dino PATH (a local facebook/dino-vits16 folder) and --clip PATH "
                              "(a local CLIP folder, e.g. openai/clip-vit-large-patch14); nothing is downloaded")
    found = defaults_from_output(args.model)
    photos = args.photos or found.get("photos")
    if not photos:
        raise DreamBoothError(f"{args.model} has no config.yaml naming the subject photos: pass --photos DIR")
    templates = read_templates(args.prompts_file) if args.prompts_file else TEMPLATES[args.subject_type][: args.num_prompts]
    settings = RealEvalSettings(
        identifier=args.identifier or found.get("identifier"), noun=args.class_noun or found.get("noun"),
        templates=templates, class_prompt=args.class_prompt or found.get("class_prompt"), num_images=args.num_images,
        class_images=args.class_images, seed=args.seed, scheduler=args.scheduler, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, resolution=args.resolution, batch_size=args.batch_size)
    result = evaluate_real(args.model, photos, args.dino, args.clip, settings, lora_base=args.lora_base,
                           device=_device(), out_dir=args.out_dir)
    print(format_table(result))
    print(f"written to {Path(args.out_dir or args.model) / 'evaluation-real.json'}")


def cmd_identifier(args) -> None:
    from .identifier import ClassifierMeasure, ClipMeasure, IdentifierSettings, format_table, pick_identifier
    from .miniworld.evaluate import BASES, DEFAULT_CLASSIFIER

    miniature = any(Path(args.model).resolve() == base.resolve() for base in BASES.values())
    measure = None
    if not args.no_render:
        if args.classifier or (miniature and not args.clip):
            measure = ClassifierMeasure(args.classifier or DEFAULT_CLASSIFIER)
        elif args.clip:
            measure = ClipMeasure(args.clip, _device())
    settings = IdentifierSettings(
        noun=args.class_noun, template=args.prompt, class_template=args.class_prompt, num_candidates=args.num_candidates,
        max_length=args.max_length, id_range=tuple(args.id_range) if args.id_range else None, exclude=tuple(args.exclude),
        tokens=tuple(args.token), num_images=args.num_images, seed=args.seed, scheduler=args.scheduler,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
        threshold=args.threshold)
    out_dir = Path(args.out_dir or f"outputs/identifier-{Path(args.model).name}")
    result = pick_identifier(args.model, settings, out_dir, measure=measure, render=not args.no_render, device=_device())
    print(format_table(result))
    print(f"written to {out_dir} (identifier.json" + (", grid.png, tokens/*.png)" if not args.no_render else ")"))


def cmd_doctor(args) -> int:
    from .doctor import run

    return run(args)


def cmd_ui(args) -> None:
    try:
        from .ui.app import launch
    except ImportError as e:  # gradio is an optional extra
        raise DreamBoothError(f"the web UI needs gradio ({e}): pip install 'dreambooth[ui]'") from None
    launch(root=args.root, host=args.host, port=args.port, token=args.token)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth", description="Teach a text-to-image model a subject or style "
                                     "from a handful of photos (DreamBooth).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model on your photos", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train DreamBooth (full fine-tune or LoRA). Every setting below can also go in a "
                       "YAML file given with --config; flags override the file, which overrides the preset.")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("class-images", help="generate the class images for prior preservation (train does this too)",
                       description="Generate (or check and reuse) class images with the base model; same settings as train.")
    add_config_flags(p)
    p.set_defaults(func=cmd_class_images)

    p = sub.add_parser("sample", help="render images from a trained output (full or LoRA)",
                       description="Render images from a `dreambooth train` output folder.")
    p.add_argument("model", help="a dreambooth output folder (full pipeline or LoRA)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--preset", choices=sorted(SAMPLE_PRESETS), default="default",
                   help="default: DPM-Solver++ 25 steps; overfit: DDIM 100 steps (the blog's fix for overfit models)")
    p.add_argument("--scheduler", default=None, choices=SAMPLERS, help="sampler (overrides --preset)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (overrides --preset)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--base", default=None, help="base model for a LoRA output (default: the one in its config.yaml)")
    p.add_argument("--out-dir", default=None, help="default: MODEL/generated")
    p.add_argument("--upscale", action="append", default=[], metavar="MODEL",
                   help="a cascade stage that upscales the previous stage's images: an IF stage II output or base "
                   "folder, then optionally an x4 upscaler folder (StableDiffusionUpscalePipeline); repeat in order")
    p.add_argument("--upscale-prompt", default=None,
                   help="prompt for the --upscale stages (default: --prompt; the guide drops the identifier there, "
                   "e.g. 'a dog' for 'a sks dog')")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("convert", help="single-file checkpoint <-> diffusers folder (A1111/ComfyUI interop), offline",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert between a single-file checkpoint (.safetensors/.ckpt, the layout AUTOMATIC1111 "
                       "and ComfyUI use) and a diffusers folder, for SD 1.x, SD 2.x and SDXL base. Nothing is "
                       "downloaded: the architectures of the public base models ship with the package. The result is "
                       "read back and compared before the command succeeds.",
                       epilog="examples:\n"
                       "  dreambooth convert v1-5-pruned-emaonly.safetensors ./sd15            # file -> diffusers folder\n"
                       "  dreambooth convert ./outputs/my-dog ./my-dog.safetensors --precision fp16   # trained model -> A1111\n"
                       "  dreambooth convert custom.safetensors ./custom --config ./its-diffusers-folder\n"
                       "To train from a single file directly: dreambooth train --model.path model.safetensors ...")
    p.add_argument("src", help="a .safetensors/.ckpt single file, or a diffusers folder (a base model or a full "
                   "fine-tune's output)")
    p.add_argument("dst", help="a folder (for a single-file SRC) or a .safetensors file (for a folder SRC)")
    p.add_argument("--config", default=None, help="the single file's architecture: sd15, sd2-512, sd2-768-v, sdxl-base, "
                   "or a diffusers folder with matching configs and tokenizers (default: detected from the keys)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16",
                   help="weights of a written single file (default fp16, as A1111 models are shared)")
    p.add_argument("--allow-pickle", action="store_true", help="load a .ckpt that torch's safe loader refuses; a pickle "
                   "can run arbitrary code, so only for files you trust")
    p.add_argument("--no-verify", action="store_true", help="skip loading the result back and comparing it")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="teach the bundled miniature base model a held-out subject (CPU, minutes)",
                       description="Train one held-out subject of the miniature world into the committed miniature "
                       "base model with the same `train` code path, write a before/after grid and print the evaluation, "
                       "with the acceptance bar's verdict (subject and prompt fidelity, class drift, and general prompt "
                       "following against the base's). The recipe is the measured default (docs/experiments/acceptance-bar.md): "
                       "the paper's full fine-tune with the text encoder learning only the identifier's embedding, the "
                       "class prompt distilled from the frozen base, and light knowledge preservation.")
    p.add_argument("--output-dir", default=None, help="default: outputs/miniworld-demo (-sdxl / -if for those families)")
    p.add_argument("--subject", default="banded_heart", help="a held-out subject of the miniature world")
    p.add_argument("--family", default="sd", choices=["sd", "sdxl", "if"],
                   help="which miniature base: sd (one CLIP encoder), sdxl (two encoders, pooled embedding, size/crop ids) "
                   "or if (DeepFloyd IF stage I: pixel space, T5 encoder, learned-variance UNet)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps in all (default: the demo recipe's); its embedding-only first steps keep their share")
    p.add_argument("--no-prior", action="store_true", help="train without prior preservation of any kind (to see language drift and forgetting)")
    p.add_argument("--lora", action="store_true", help="the measured LoRA default instead (sd only): rank-8 adapters on "
                   "every layer of the UNet's attention blocks and resnets at lr 1e-3 for 700 steps, the identifier's embedding "
                   "beside them")
    p.add_argument("--n", type=int, default=32, help="images per evaluation prompt")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="measure a model: the miniature world's classifier, or DINO/CLIP metrics (--real)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score a trained output (full or LoRA). Without --real: a miniature-world model, with "
                       "the bundled attribute classifier, beside the base model for reference. With --real: any model, "
                       "with the DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV; docs/metrics.md) against "
                       "the subject's photos, using DINO and CLIP folders you downloaded beforehand.",
                       epilog="examples:\n"
                       "  dreambooth evaluate outputs/heart --subject banded_heart            # miniature world\n"
                       "  dreambooth evaluate outputs/my_dog --real --dino ./dino-vits16 --clip ./clip-vit-large-patch14 \\\n"
                       "      --subject-type live                     # photos, identifier, noun from its config.yaml\n"
                       "  dreambooth evaluate ./sd15 --real --dino ./dino-vits16 --clip ./clip --photos ./dog \\\n"
                       "      --identifier sks --class-noun dog       # a base model as the baseline\n"
                       "fetch the scorers once, where there is internet:\n"
                       "  huggingface-cli download facebook/dino-vits16 --local-dir ./dino-vits16\n"
                       "  huggingface-cli download openai/clip-vit-large-patch14 --local-dir ./clip-vit-large-patch14")
    p.add_argument("model", help="a dreambooth output folder (full or LoRA), or any pipeline folder")
    p.add_argument("--subject", default=None, help="miniature world: the held-out subject it was taught")
    p.add_argument("--n", type=int, default=32, help="miniature world: images per prompt (fixed seeds)")
    p.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed + i")
    p.add_argument("--base", default=None, help="reference base model (default: the bundled miniature base the output "
                   "was trained from, SD or SDXL)")
    p.add_argument("--no-base", action="store_true", help="skip measuring the base")
    p.add_argument("--lora-base", default=None, help="base for a LoRA output whose config.yaml path moved")
    p.add_argument("--json", default=None, help="miniature world: also write the results as JSON here")
    real = p.add_argument_group("real models (--real)")
    real.add_argument("--real", action="store_true", help="score with DINO / CLIP against the subject's photos "
                      "(writes evaluation-real.json and evaluation-real.png)")
    real.add_argument("--dino", metavar="PATH", help="local DINO ViT folder (facebook/dino-vits16, a ViTModel): DINO, "
                      "PRES and DIV")
    real.add_argument("--clip", metavar="PATH", help="local CLIP folder with its tokenizer (CLIPModel, e.g. "
                      "openai/clip-vit-large-patch14): CLIP-I and CLIP-T")
    real.add_argument("--photos", metavar="DIR", help="the subject's photos (default: concept.instance_dir of the "
                      "output's config.yaml)")
    real.add_argument("--identifier", help="the rare token (default: from config.yaml, e.g. sks); CLIP-T scores each "
                      "prompt without it")
    real.add_argument("--class-noun", help="the class noun that follows the identifier (default: the instance "
                      "prompt's last word, e.g. dog)")
    real.add_argument("--subject-type", choices=sorted(TEMPLATES), default="object",
                      help="DreamBench's prompt list: object (20 new contexts + 5 property changes) or live (dogs, "
                      "cats: 10 contexts, 10 accessories, 5 properties)")
    real.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts of the list (a quick "
                      "look; the paper uses all 25)")
    real.add_argument("--prompts-file", metavar="FILE", help="your own prompt templates, one a line, with {identifier} "
                      "and {noun}, e.g. 'a {identifier} {noun} in the snow'")
    real.add_argument("--num-images", type=int, default=4, help="images per prompt (the paper: 4; at least 2 for DIV)")
    real.add_argument("--class-images", type=int, default=16, help="images of the class prompt for PRES")
    real.add_argument("--class-prompt", help="PRES's prompt (default: config.yaml's class_prompt, else 'a NOUN')")
    real.add_argument("--scheduler", choices=SAMPLERS, default="dpm++", help="sampler (default dpm++)")
    real.add_argument("--steps", type=int, default=25, help="inference steps")
    real.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    real.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's)")
    real.add_argument("--batch-size", type=int, default=4, help="images per pipeline call: memory, not results")
    real.add_argument("--out-dir", default=None, help="where the JSON and the grid go (default: MODEL)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("identifier", help="pick a rare-token identifier (like sks) for a base model, the paper's way",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="List rare tokens of the model's vocabulary that could name your subject (1-3 "
                       "letters, no common word, one token in every tokenizer of the model), render 'a photo of TOKEN "
                       "NOUN' beside 'a photo of a NOUN' with the same seeds, and flag the tokens the model already "
                       "associates with something. The measure: the bundled classifier for the miniature base, CLIP "
                       "(--clip) elsewhere; without either, the grids only.",
                       epilog="examples:\n"
                       "  dreambooth identifier --model ./stable-diffusion-v1-5 --class-noun dog --clip ./clip-vit-large-patch14\n"
                       "  dreambooth identifier --model ./sdxl-base --class-noun dog --token sks --token ohwx   # check yours too\n"
                       "  dreambooth identifier --model src/dreambooth/miniworld/assets/base --class-noun toy\n"
                       "  dreambooth identifier --model ./IF-I-XL-v1.0 --class-noun dog --id-range 5000 10000 --no-render")
    p.add_argument("--model", required=True, help="the base model folder you will train (or a single-file checkpoint)")
    p.add_argument("--class-noun", required=True, help="the class noun of your subject, e.g. dog")
    p.add_argument("--token", action="append", default=[], metavar="WORD",
                   help="also check this identifier (repeat for several), e.g. --token sks")
    p.add_argument("--num-candidates", type=int, default=8, help="rare tokens to list (default 8)")
    p.add_argument("--max-length", type=int, default=3, help="longest candidate, in letters (the paper: 3)")
    p.add_argument("--id-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                   help="draw from token ids LO <= id < HI of the first tokenizer (default: its rarer half; the paper "
                   "used 5000 10000 of T5's 32,000)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="WORD", help="more words never to propose")
    p.add_argument("--prompt", default="a photo of {token} {noun}", help="the subject prompt template (default: "
                   "'a photo of {token} {noun}', as your instance prompt will read)")
    p.add_argument("--class-prompt", default="a photo of a {noun}", help="the plain class prompt template")
    p.add_argument("--num-images", type=int, default=4, help="renders per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    p.add_argument("--scheduler", choices=SAMPLERS, default="dpm++")
    p.add_argument("--steps", type=int, default=25, help="inference steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--clip", metavar="PATH", help="a local CLIP folder: measure how far each token's renders are "
                   "from the class prompt's")
    p.add_argument("--classifier", metavar="DIR", help="a miniature-world attribute classifier (default for the "
                   "bundled miniature bases: the bundled one)")
    p.add_argument("--threshold", type=float, default=None, help="flag tokens whose association exceeds this "
                   "(default: 0.25 total variation for the classifier, 0.05 cosine for CLIP)")
    p.add_argument("--no-render", action="store_true", help="only list the candidates and their tokenization")
    p.add_argument("--out-dir", default=None, help="default: outputs/identifier-MODELNAME")
    p.set_defaults(func=cmd_identifier)

    p = sub.add_parser("doctor", help="check a folder of photos before training: buckets, duplicates, blur, captions",
                       description="Report what training will make of a folder of photos: each photo's size, aspect, "
                       "bucket, EXIF rotation, pixel mode and caption; exact and near duplicates, blurry photos, photos too "
                       "small for their bucket, the class folder's provenance. Writes a contact sheet of the training "
                       "crops. Exits 1 if there are errors.")
    p.add_argument("folder", help="the folder of subject photos (concept.instance_dir)")
    p.add_argument("--model", default=None, help="the base model folder: its latent factor sets the bucket step, its "
                   "family the bucket default, its fingerprint the class-folder check")
    p.add_argument("--resolution", type=int, default=512, help="data.resolution (default: 512)")
    p.add_argument("--buckets", default=None, type=lambda v: v.lower() in {"true", "1", "on", "yes"}, metavar="BOOL",
                   help="data.buckets (default: the model's family default, off without --model)")
    p.add_argument("--bucket-min-side", type=int, default=None, help="data.bucket_min_side (default: resolution / 2)")
    p.add_argument("--bucket-max-side", type=int, default=None, help="data.bucket_max_side (default: resolution x 2)")
    p.add_argument("--bucket-step", type=int, default=None, help="data.bucket_step (default: latent factor x 8)")
    p.add_argument("--latent-factor", type=int, default=8, help="without --model: the VAE's factor (bucket step = factor "
                   "x 8; 8 for SD/SDXL, 1 for IF)")
    p.add_argument("--min-size", type=int, default=None, help="data.min_size (default: resolution / 2)")
    p.add_argument("--caption-extension", default=".txt", help="data.caption_extension (default: .txt)")
    p.add_argument("--identifier", default=None, help="the subject's identifier that captions should contain (e.g. sks)")
    p.add_argument("--instance-prompt", default=None, help="concept.instance_prompt; its word before the last is the "
                   "identifier when --identifier is not given")
    p.add_argument("--class-dir", default=None, help="a class-image folder to report on (generated or your own)")
    p.add_argument("--blur-threshold", type=float, default=None,
                   help="blurry below this variance of the Laplacian of the training crop (default: 100)")
    p.add_argument("--contact-sheet", default=None, help="where to write the PNG (default: FOLDER-contact-sheet.png "
                   "beside the folder, never inside it, where training would take it for a photo)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("ui", help="a local web app: train, watch, compare runs, render samples",
                       description="Start the web UI (gradio) on this machine and print its URL. It reads and writes "
                       "only inside the workspace folder, runs one training job at a time in its own process, and "
                       "reattaches to a running job when the page is reloaded or the UI restarted.")
    p.add_argument("--root", default=".", help="workspace folder: photos, models and runs live below it (default: .)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, this machine only); any "
                   "other address requires a token")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", default=None, help="the password for a non-loopback --host (default: "
                   "$DREAMBOOTH_UI_TOKEN, else a random one, printed at start-up)")
    p.set_defaults(func=cmd_ui)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """'--optim.lr -1e-4' -> '--optim.lr=-1e-4'.

    argparse takes a value that starts with '-' for a flag unless it looks like a plain negative
    integer or decimal, so '-1e-4' failed with "expected one argument" instead of reaching the
    config check that explains what is wrong with it.
    """
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = args.func(args)
    except DreamBoothError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status or 0  # a command may return its own exit status (doctor: 1 when it found errors)


if __name__ == "__main__":
    sys.exit(main())
