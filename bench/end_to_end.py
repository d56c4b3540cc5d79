"""End to end, photos -> trained model with prior preservation, class-image generation included.

On a CPU, generating class images dominates a short DreamBooth run. This times the two parts of
`dreambooth train` apart - `ensure_class_images` (what train calls first) and the training run that
then reuses them - for a sampler setting, on a named random-weight architecture:

    OMP_NUM_THREADS=1 python bench/end_to_end.py --arch small --threads 1                       # our defaults
    OMP_NUM_THREADS=1 python bench/end_to_end.py --arch small --threads 1 --scheduler pndm --sampling-steps 50 --sample-batch 1

The second line is the generation setting of diffusers' train_dreambooth.py (PNDM, 50 steps; its
sample_batch_size defaults to 4, so also try --sample-batch 4). Training settings are the same in
every run: 5 photos, 10 class images, 50 steps, batch 1, text encoder frozen, latents cached.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bench import build_in_child  # bench/bench.py, beside this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small", choices=["tiny", "small", "sd15", "sd2"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--scheduler", default="dpm++", help="class-image sampler (prior.scheduler)")
    p.add_argument("--sampling-steps", type=int, default=25, help="prior.num_inference_steps")
    p.add_argument("--sample-batch", type=int, default=4, help="prior.batch_size")
    p.add_argument("--class-images", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="training steps")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["ACCELERATE_USE_CPU"] = "true"
    from dreambooth.config import build_config
    from dreambooth.data.class_images import ensure_class_images
    from dreambooth.tiny import ARCHITECTURES, write_photos
    from dreambooth.data.prior import class_image_settings
    from dreambooth.train import train

    resolution = ARCHITECTURES[args.arch]["resolution"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_in_child(tmp / "model", args.arch)
        write_photos(tmp / "photos", 5, seed=0, size=resolution)
        cfg = build_config({
            "model": {"path": str(tmp / "model")},
            "concept": {"instance_dir": str(tmp / "photos"), "instance_prompt": "a photo of sks dog",
                        "class_prompt": "a photo of a dog", "class_dir": str(tmp / "class")},
            "data": {"resolution": resolution, "min_size": 8},
            "prior": {"enabled": True, "num_class_images": args.class_images, "scheduler": args.scheduler,
                      "num_inference_steps": args.sampling_steps, "batch_size": args.sample_batch},
            "optim": {"lr": 1e-6},
            "train": {"max_steps": args.steps, "output_dir": str(tmp / "out")},
        })
        concept = cfg.resolved_concepts()[0]
        t0 = time.perf_counter()
        ensure_class_images(cfg.model.path, concept.class_dir, class_image_settings(cfg, concept))
        generate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = train(cfg)  # finds the class images and reuses them
        train_s = time.perf_counter() - t0
    print(f"{args.arch} at {resolution} px, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"class images   {args.class_images} x {args.scheduler} {args.sampling_steps} steps, batch {args.sample_batch}: {generate_s:.1f} s")
    print(f"training       {result.steps} steps (load, latents, loop, export): {train_s:.1f} s")
    print(f"end to end     {generate_s + train_s:.1f} s")


if __name__ == "__main__":
    main()
