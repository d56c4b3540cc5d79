"""Measure a DreamBooth output (or any pipeline folder) on a miniature-world subject.

    python scripts/miniworld_evaluate.py OUTPUT --subject banded_heart --base src/dreambooth/miniworld/assets/base --json eval.json
    python scripts/miniworld_evaluate.py src/dreambooth/miniworld/assets/base --subject banded_heart   # the base alone

Prints a table; with --json also writes the full result. See src/dreambooth/miniworld/evaluate.py.
"""

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--subject", default=None, help="held-out subject (default: none, class and attribute metrics only)")
    parser.add_argument("--base", type=Path, default=None, help="also measure this base pipeline folder, for reference")
    parser.add_argument("--n", type=int, default=32, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from dreambooth.miniworld.evaluate import EvalSettings, evaluate, format_table

    settings = EvalSettings(n=args.n, seed=args.seed, guidance_scale=args.guidance, num_inference_steps=args.steps,
                            scheduler=args.scheduler)
    result = evaluate(args.model_dir, args.subject, base_dir=args.base, settings=settings)
    print(format_table(result))
    print(f"({result['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
