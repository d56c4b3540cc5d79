"""Pretrain the miniature world's models from scratch, one stage at a time.

    python scripts/miniworld_pretrain.py --stage vae --minutes 12         # -> src/dreambooth/miniworld/assets/base/vae
    python scripts/miniworld_pretrain.py --stage classifier --minutes 6   # -> src/dreambooth/miniworld/assets/classifier
    python scripts/miniworld_pretrain.py --stage base --minutes 40 --tokenizer TOK   # -> src/dreambooth/miniworld/assets/base
    python scripts/miniworld_pretrain.py --stage base-sdxl --minutes 30   # -> src/dreambooth/miniworld/assets/base-sdxl
    python scripts/miniworld_pretrain.py --stage base-if --minutes 40 --tokenizer T5TOK   # -> src/dreambooth/miniworld/assets/base-if

The SDXL base (two text encoders, pooled embedding, size/crop time ids) shares the SD base's VAE
and tokenizer files: they are symlinks into base/ in git, and copies in a wheel.

TOK is the full CLIP tokenizer (49,408 tokens, `sks` = 48136), derived from the vocabulary file
the open-clip-torch wheel ships:

    pip download --no-deps -d /tmp/oc open-clip-torch==3.3.0 && unzip -o -d /tmp/oc /tmp/oc/*.whl '*bpe_simple*'
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz /tmp/clip_tokenizer

The IF stage I base (pixel space: no VAE) reads prompts with a T5 tokenizer of the world's words,
T5TOK, made by `python scripts/make_t5_tokenizer.py --miniworld T5TOK`.

Run the stages in this order (the classifier and the base use the VAE). Each stage is
deterministic for a given `--steps`; with `--minutes` only, it sizes itself to the budget and
records the step count it chose in src/dreambooth/miniworld/assets/recipe.json. Runs on one CPU thread by
default (`--threads`), on CUDA when available.
"""

import argparse
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["vae", "classifier", "base", "base-sdxl", "base-if"], required=True)
    parser.add_argument("--minutes", type=float, default=None, help="time budget; sets the step count after a short probe")
    parser.add_argument("--steps", type=int, default=None, help="exact number of steps (replays a recorded run)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: under src/dreambooth/miniworld/assets)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="stage base: CLIP tokenizer folder from scripts/make_clip_tokenizer.py (default: the base's own); "
                             "stage base-if: T5 tokenizer folder from scripts/make_t5_tokenizer.py --miniworld")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from dreambooth.miniworld import recipes

    if args.minutes is None and args.steps is None:
        args.minutes = {"vae": 12, "classifier": 6, "base": 40, "base-sdxl": 30, "base-if": 40}[args.stage]
    if args.stage == "vae":
        info = recipes.train_vae(args.out or recipes.ASSETS / "base" / "vae", args.minutes, args.steps)
    elif args.stage == "classifier":
        info = recipes.train_classifier(args.out or recipes.ASSETS / "classifier", minutes=args.minutes, steps=args.steps)
    elif args.stage == "base":
        info = recipes.train_base(args.out or recipes.ASSETS / "base", args.tokenizer, minutes=args.minutes, steps=args.steps)
    elif args.stage == "base-if":
        if args.tokenizer is None:
            parser.error("--stage base-if needs --tokenizer: a folder from scripts/make_t5_tokenizer.py --miniworld")
        info = recipes.train_base(args.out or recipes.ASSETS / "base-if", args.tokenizer, minutes=args.minutes, steps=args.steps,
                                  recipe=recipes.IF_BASE)
    else:
        base, out = recipes.ASSETS / "base", args.out or recipes.ASSETS / "base-sdxl"
        info = recipes.train_base(out, args.tokenizer or base / "tokenizer", minutes=args.minutes, steps=args.steps,
                                  recipe=recipes.SDXL_BASE, vae_dir=base / "vae")
        same = ["vae/config.json", "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"]
        recipes.share_files(out, base, {**{n: n for n in same}, "tokenizer_2/vocab.json": "tokenizer/vocab.json",
                                        "tokenizer_2/merges.txt": "tokenizer/merges.txt"})
    if args.out is None:
        recipes.record(args.stage, info)


if __name__ == "__main__":
    main()
