"""Our bf16 AdamW (bf16_adamw.py) against torchao's optimizers: training quality, CPU step time, state memory.

torchao (`pip install torchao`, not a dependency) offers what bf16_adamw.py writes by hand:
`torchao.optim.AdamW8bit(bf16_stochastic_round=True)` (8-bit blockwise moments, bf16 weights with
stochastic rounding) and `torchao.optim._AdamW(bf16_stochastic_round=True)`, whose moments take the
weights' dtype (bf16 here) - a private class in torchao 0.18 (its public `AdamW` was removed),
documented "only for torchao's quantized training". torchao has no bf16-weight AdamW with fp32
moments, our default for bf16 weights.

1. Quality: the quality guard of tests/test_speed_modes.py - 200 steps of the tiny model (prior
   preservation, text encoder trained, lr 1e-4 constant), the 20-step moving average of the loss
   against plain fp32 AdamW's; the guard's tolerance is 0.02. Each optimizer is put in place of
   ours through the one place train() builds it.
2. Speed and memory: one optimizer step over bf16 weights shaped like SD 1.5's UNet blocks
   (--values in total), at --threads threads, median of --repeats; state bytes per weight.

    OMP_NUM_THREADS=1 python bench/torchao_compare.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

QUALITY_STEPS, WINDOW, LR = 200, 20, 1e-4


def torchao_factory(params, lr, betas, weight_decay, eps, moments_dtype=torch.float32, stochastic_rounding=True,
                    float_lr=True):
    """torchao's optimizer for what AdamWStochasticRounding would have been asked for."""
    import torchao.optim as ao

    if moments_dtype == torch.uint8:
        cls = ao.AdamW8bit
    elif moments_dtype == torch.bfloat16:  # _AdamW keeps its moments in the weights' dtype
        cls = ao._AdamW
    else:
        raise ValueError("torchao has no AdamW for bf16 weights with fp32 moments")
    if float_lr:
        cls = type(cls.__name__, (FloatLR, cls), {})
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bf16_stochastic_round=stochastic_rounding)


class FloatLR:
    """torchao keeps each group's lr as a 0-d tensor (so torch.compile does not recompile when it
    changes) and refuses a step after anything set a float there, which torch's LR schedulers do
    every step; our logs and checkpoint JSON also expect floats. A drop-in needs this adapter:
    floats outside step(), a tensor inside."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for group in self.param_groups:
            group["lr"] = float(group["lr"])

    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]))
        try:
            return super().step(closure)
        finally:
            for group in self.param_groups:
                group["lr"] = float(group["lr"])


def quality_curve(model: Path, photos: Path, out: Path, settings: dict, class_images: Path | None) -> torch.Tensor:
    import shutil

    from dreambooth.config import build_config
    from dreambooth.train import train

    if class_images is not None:
        shutil.copytree(class_images, out / "class_images")
    cfg = {
        "model": {"path": str(model)},
        "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"},
        "data": {"resolution": 32, "min_size": 16},
        "prior": {"enabled": True, "num_class_images": 3, "num_inference_steps": 2, "batch_size": 3},
        "text_encoder": {"train": True},
        "optim": {"lr": LR, "lr_scheduler": "constant", "warmup_steps": 0, "max_grad_norm": None, **settings.get("optim", {})},
        "train": {"max_steps": QUALITY_STEPS, "batch_size": 1, "output_dir": str(out)},
        "memory": settings.get("memory", {}),
        "export": {"verify": False},
    }
    result = train(build_config(cfg))
    losses = torch.tensor([result.losses[s] for s in range(1, QUALITY_STEPS + 1)])
    return losses.unfold(0, WINDOW, 1).mean(1)


def quality(root: Path) -> dict[str, float]:
    from dreambooth import bf16_adamw
    from dreambooth.tiny import build_tiny_sd, write_photos

    model = build_tiny_sd(root / "tiny-sd")
    photos = root / "photos"
    write_photos(photos, 5)
    reference = quality_curve(model, photos, root / "fp32", {}, None)
    bf16 = {"memory": {"mixed_precision": "bf16", "weights_dtype": "bf16"}}
    runs = {
        "ours: bf16 weights, fp32 moments": (bf16, False),
        "ours: bf16 weights, bf16 moments": ({**bf16, "optim": {"moments_dtype": "bf16"}}, False),
        "torchao _AdamW(bf16_stochastic_round), bf16 moments": ({**bf16, "optim": {"moments_dtype": "bf16"}}, True),
        "ours: bf16 weights, 8-bit moments": ({**bf16, "optim": {"moments_dtype": "int8"}}, False),
        "torchao AdamW8bit(bf16_stochastic_round)": ({**bf16, "optim": {"moments_dtype": "int8"}}, True),
    }
    ours = bf16_adamw.AdamWStochasticRounding
    results = {}
    for i, (name, (settings, use_torchao)) in enumerate(runs.items()):
        bf16_adamw.AdamWStochasticRounding = torchao_factory if use_torchao else ours
        try:
            curve = quality_curve(model, photos, root / f"run{i}", settings, root / "fp32" / "class_images")
        finally:
            bf16_adamw.AdamWStochasticRounding = ours
        results[name] = ((curve - reference).abs() / reference).max().item()
        print(f"{name}: max relative deviation from fp32 AdamW {results[name]:.4f}", flush=True)
    return results


def speed(values: int, repeats: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    from dreambooth.bf16_adamw import AdamWStochasticRounding

    # SD 1.5's UNet in miniature: mostly 1280x1280 / 640x640 linears and 3x3 convolutions
    shapes = [(1280, 1280), (640, 640), (1280, 1280, 3, 3), (320, 320, 3, 3), (1280,), (5120, 1280)]
    params, n, i = [], 0, 0
    torch.manual_seed(0)
    while n < values:
        shape = shapes[i % len(shapes)]
        params.append(torch.nn.Parameter(torch.randn(shape, device=device).to(torch.bfloat16)))
        n += params[-1].numel()
        i += 1
    candidates = {
        "ours, fp32 moments": lambda ps: AdamWStochasticRounding(ps, lr=1e-4),
        "ours, bf16 moments": lambda ps: AdamWStochasticRounding(ps, lr=1e-4, moments_dtype=torch.bfloat16),
        "torchao _AdamW, bf16 moments": lambda ps: torchao_factory(ps, 1e-4, (0.9, 0.999), 1e-2, 1e-8, torch.bfloat16,
                                                                   float_lr=False),
        "ours, 8-bit moments": lambda ps: AdamWStochasticRounding(ps, lr=1e-4, moments_dtype=torch.uint8),
        "torchao AdamW8bit": lambda ps: torchao_factory(ps, 1e-4, (0.9, 0.999), 1e-2, 1e-8, torch.uint8, float_lr=False),
    }
    out = {}
    for name, make in candidates.items():
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(params)
        opt.step()  # allocates the state
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        state = 0
        for s in opt.state.values():
            for v in s.values():
                if hasattr(v, "__tensor_flatten__"):  # torchao's quantized state (a tensor subclass): its inner tensors
                    inner, _ = v.__tensor_flatten__()
                    state += sum(getattr(v, a).numel() * getattr(v, a).element_size() for a in inner)
                elif isinstance(v, torch.Tensor):
                    state += v.numel() * v.element_size()
        out[name] = {"seconds_per_step": statistics.median(times), "state_bytes_per_weight": state / n}
        print(f"{name}: {out[name]['seconds_per_step'] * 1000:.0f} ms per step over {n / 1e6:.1f} M weights, "
              f"state {out[name]['state_bytes_per_weight']:.2f} bytes/weight", flush=True)
        del opt
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--values", type=int, default=20_000_000, help="weights in the speed test")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the speed test runs (quality: CPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torchao

    print(f"torch {torch.__version__}, torchao {torchao.__version__}, {args.threads} thread(s)", flush=True)
    result = {"threads": args.threads, "torchao": torchao.__version__, "device": args.device,
              "speed": speed(args.values, args.repeats, args.device)}
    if not args.skip_quality:
        with tempfile.TemporaryDirectory() as tmp:
            result["quality_max_relative_deviation"] = quality(Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
