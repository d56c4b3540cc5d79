"""Training speed and memory of the real `dreambooth train` code path, against the hardware's limit.

Builds a named architecture with random weights (speed and memory do not depend on the values),
writes synthetic photos, and runs `dreambooth.train.train` on it. Prints a table: steps/s,
samples/s, peak memory, the time split per phase, achieved TFLOP/s and the fraction of a
measured dense-matmul peak. Class images are synthetic and supplied (generation is excluded,
as in the R15 workload); latents are cached when augmentation is off, as in training.

    OMP_NUM_THREADS=1 python bench/bench.py --arch tiny --threads 1
    python bench/bench.py --arch small --threads 2 --steps 30
    python bench/bench.py --arch sd15 --device cuda --mixed-precision bf16 --train-text-encoder --prior   # R15, GPU

FLOPs are counted once per configuration with torch's FlopCounterMode over one UNet (and text
encoder, if trained) forward + backward at the run's batch shape; optimizer FLOPs are ignored.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def measure_peak_tflops(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Dense matmul throughput on this device/dtype/thread count: the 'physical limit' we compare to."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def count_step_flops(model_dir: Path, batch: int, resolution: int, train_te: bool) -> float:
    """FLOPs of one forward + backward of the trainable models at the training batch shape (any family)."""
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    from dreambooth.models.load import load_components

    comps = load_components(model_dir)
    family = comps.family
    side = resolution // family.latent_factor(model_dir)
    latents = torch.randn(batch, comps.denoiser.config.in_channels, side, side)
    geometry = SimpleNamespace(original_sizes=[(resolution, resolution)] * batch, crops=[(0, 0)] * batch,
                               target_size=(resolution, resolution))  # what per-image conditioning reads
    comps.denoiser.requires_grad_(True)
    for name in family.text_encoders:
        comps.modules[name].requires_grad_(train_te)
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(True):
            text = family.encode_prompt(comps, ["a photo of sks dog"] * batch)
            cond = family.conditioning(comps, text, geometry, latents, torch.Generator().manual_seed(0))
            out = family.predict(comps, latents, torch.randint(0, 1000, (batch,)), cond)
            out.float().pow(2).mean().backward()
    return counter.get_total_flops()


def build_in_child(path: Path, arch: str) -> Path:
    """Write the random-weight `arch` pipeline to `path` from a child process, so that this
    process's peak RSS is the training run's alone (imports + load + train), not the construction's."""
    from dreambooth.tiny import build_sd, build_sdxl

    target, name = (build_sdxl, SDXL_NAMES[arch]) if arch in SDXL_NAMES else (build_sd, arch)
    build = multiprocessing.get_context("spawn").Process(target=target, args=(path, name))
    build.start()
    build.join()
    if build.exitcode:
        sys.exit(f"building the {arch} model failed (exit code {build.exitcode})")
    return path


SDXL_NAMES = {"tiny-sdxl": "tiny", "sdxl": "sdxl"}  # bench name -> tiny.SDXL_ARCHITECTURES name


class WindowPeak:
    """Peak memory over the timed steps only (R15's window), not load time or the warmup steps.

    At the end of the last warmup step it resets the CUDA peak counters and, on Linux, the process's
    peak RSS (writing 5 to /proc/self/clear_refs resets VmHWM); `rss_mib` then reads VmHWM.
    """

    def __init__(self, warmup: int, device: str):
        from dreambooth import timing

        self.rss_mib = None
        self._original = timing.PhaseTimer.end_step
        steps = {"n": 0}

        def end_step(timer):
            self._original(timer)
            steps["n"] += 1
            if steps["n"] == warmup:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    Path("/proc/self/clear_refs").write_text("5")
                except OSError:
                    pass  # not Linux: no window figure for RSS

        timing.PhaseTimer.end_step = end_step

    def close(self) -> None:
        from dreambooth import timing

        timing.PhaseTimer.end_step = self._original
        try:
            status = Path("/proc/self/status").read_text()
            self.rss_mib = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) / 1024
        except (OSError, StopIteration):
            self.rss_mib = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=["tiny", "small", "sd15", "sd2", "tiny-sdxl", "sdxl"],
                   help="sdxl: SDXL base 1.0's UNet (2.57 B), both text encoders and VAE, random weights, 1024 px")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (state it: timings depend on it)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warmup")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--method", default="full", choices=["full", "lora"])
    p.add_argument("--train-text-encoder", action="store_true", help="train every text encoder the model has")
    p.add_argument("--prior", action="store_true", help="add one class image per subject image (prior preservation)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-levels", type=int, default=0,
                   help="with --gradient-checkpointing: only the N highest-resolution UNet levels (memory.checkpoint_levels)")
    p.add_argument("--no-cache", action="store_true",
                   help="memory.cache_latents=false and memory.cache_text_embeddings=false: encode every step")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "classic"], help="memory.attention")
    p.add_argument("--channels-last", action="store_true", help="memory.channels_last=true")
    p.add_argument("--offload-text-encoders", action="store_true",
                   help="memory.offload_text_encoders=true: frozen text encoders stay on the CPU once their embeddings are cached")
    p.add_argument("--compile", action="store_true", help="memory.compile_unet=true (compile time is reported apart)")
    p.add_argument("--fused-backward", action="store_true", help="optim.fused_backward=true (implies --no-clip)")
    p.add_argument("--weights-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="memory.weights_dtype (bf16 needs --mixed-precision bf16)")
    p.add_argument("--moments-dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="optim.moments_dtype (bf16 needs --weights-dtype bf16)")
    p.add_argument("--no-clip", action="store_true", help="optim.max_grad_norm=null")
    p.add_argument("--preset", default=None, help="a training preset (fast, low-memory, ...) under the other settings")
    p.add_argument("--resolution", type=int, default=None, help="default: the architecture's")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="keep the random-weight model here and reuse it if it is already there (default: a temp folder)")
    p.add_argument("--no-flops", action="store_true",
                   help="skip the FLOP count (a full-activation fp32 forward + backward: sd15 at 512 px needs ~20 GB on CPU)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dreambooth.config import build_config
    from dreambooth.tiny import ARCHITECTURES, SDXL_ARCHITECTURES, write_photos
    from dreambooth.train import train

    spec = SDXL_ARCHITECTURES[SDXL_NAMES[args.arch]] if args.arch in SDXL_NAMES else ARCHITECTURES[args.arch]
    resolution = args.resolution or spec["resolution"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.model_dir and (args.model_dir / "model_index.json").is_file():
            model = args.model_dir  # built by an earlier run (bench/gpu_suite.sh builds each architecture once)
        else:
            model = build_in_child(args.model_dir or tmp / "model", args.arch)
        build_seconds = time.perf_counter() - t0
        write_photos(tmp / "photos", 5, seed=0, size=resolution)
        write_photos(tmp / "class", 5, seed=1, size=resolution)
        concept = {"instance_dir": str(tmp / "photos"), "instance_prompt": "a photo of sks dog"}
        if args.prior:
            concept.update(class_prompt="a photo of a dog", class_dir=str(tmp / "class"), class_images_user_supplied=True)
        total = args.warmup + args.steps
        # Only the flags given on the command line are set, so a --preset's values show through.
        optim = {"optimizer": args.optimizer, "lr": 1e-6}
        if args.fused_backward:
            optim.update(fused_backward=True, max_grad_norm=None)
        if args.no_clip:
            optim["max_grad_norm"] = None
        if args.moments_dtype != "fp32":
            optim["moments_dtype"] = args.moments_dtype
        memory = {k: v for k, v in [("mixed_precision", args.mixed_precision), ("weights_dtype", args.weights_dtype)]
                  if v != p.get_default(k)}
        memory.update({k: True for k, on in [("gradient_checkpointing", args.gradient_checkpointing),
                                              ("channels_last", args.channels_last), ("compile_unet", args.compile),
                                              ("offload_text_encoders", args.offload_text_encoders)] if on})
        if args.checkpoint_levels:
            memory["checkpoint_levels"] = args.checkpoint_levels
        if args.attention != "sdpa":
            memory["attention"] = args.attention
        if args.no_cache:
            memory.update(cache_latents=False, cache_text_embeddings=False)
        cfg = build_config({
            "model": {"path": str(model)}, "concept": concept,
            "data": {"resolution": resolution, "min_size": 8},
            "prior": {"enabled": args.prior, "num_class_images": 5},
            "text_encoder": {"train": args.train_text_encoder},
            **({"text_encoder_2": {"train": args.train_text_encoder}} if args.arch in SDXL_NAMES else {}),
            "optim": optim, "memory": memory,
            "train": {"max_steps": total, "batch_size": args.batch_size, "method": args.method,
                      "output_dir": str(tmp / "out"), "time_phases": True},
            **({"preset": args.preset} if args.preset else {}),
        })
        if args.device == "cpu":
            os.environ["ACCELERATE_USE_CPU"] = "true"
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        window_peak = WindowPeak(args.warmup, args.device)
        result = train(cfg)
        window_peak.close()
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the FLOP count loads more
        window = range(args.warmup + 1, total + 1)
        step_s = statistics.median(result.step_seconds[s] for s in window)
        phases = {name: statistics.median(values[args.warmup:]) for name, values in result.phase_seconds.items()}
        samples_per_step = args.batch_size * (2 if args.prior else 1)
        flops = None if args.no_flops else count_step_flops(model, samples_per_step, resolution, args.train_text_encoder)

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.memory.mixed_precision]
    peak = measure_peak_tflops(args.device, dtype if args.device == "cuda" else torch.float32)
    figures = {
        "arch": args.arch, "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "resolution": resolution,
        "method": args.method, "text_encoder": args.train_text_encoder, "prior": args.prior,
        "preset": args.preset, "mixed_precision": cfg.memory.mixed_precision,
        "gradient_checkpointing": cfg.memory.gradient_checkpointing, "checkpoint_levels": cfg.memory.checkpoint_levels,
        "channels_last": cfg.memory.channels_last, "attention": cfg.memory.attention, "cache_latents": cfg.cache_latents,
        "cache_text_embeddings": cfg.cache_text_embeddings,
        "compile_unet": cfg.memory.compile_unet, "weights_dtype": cfg.memory.weights_dtype,
        "offload_text_encoders": cfg.memory.offload_text_encoders,
        "moments_dtype": cfg.optim.moments_dtype,
        "fused_backward": cfg.optim.fused_backward, "max_grad_norm": cfg.optim.max_grad_norm,
        "optimizer": cfg.optim.optimizer, "batch_size": args.batch_size, "steps_timed": args.steps,
        "steps_per_s": 1 / step_s, "samples_per_s": samples_per_step / step_s,
        # the first step pays one-off costs (torch.compile's compilation, allocator warm-up)
        "first_step_s": result.step_seconds[1], "first_step_extra_s": result.step_seconds[1] - step_s,
        "phase_ms": {k: 1000 * v for k, v in phases.items()},
        "peak_rss_mib": peak_rss_mib, "window_peak_rss_mib": window_peak.rss_mib,
        "tflop_per_step": flops and flops / 1e12, "achieved_tflops": flops and flops / step_s / 1e12, "matmul_peak_tflops": peak,
        "model_build_s": build_seconds, "trainable_parameters": result.trainable_parameters,
    }
    if args.device == "cuda":
        figures["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def print_table(f: dict) -> None:
    rows = [
        ("architecture", f"{f['arch']} at {f['resolution']} px, {f['method']}, text encoder {'trained' if f['text_encoder'] else 'frozen'}, "
                         f"prior {'on' if f['prior'] else 'off'}, batch {f['batch_size']}"),
        ("device", f"{f['device']}, {f['threads']} threads, torch {f['torch']}, precision {f['mixed_precision']}"),
        ("options", f"preset {f['preset']}, weights {f['weights_dtype']}, moments {f['moments_dtype']}, "
                    f"attention {f['attention']}, channels_last {f['channels_last']}, cache latents/text {f['cache_latents']}/{f['cache_text_embeddings']}, "
                    f"compile {f['compile_unet']}, fused_backward {f['fused_backward']}, "
                    f"text encoders offloaded {f['offload_text_encoders']}, "
                    f"checkpointing {f['gradient_checkpointing']} (levels {f['checkpoint_levels'] or 'all'}), clip {f['max_grad_norm']}, {f['optimizer']}"),
        ("trainable parameters", f"{f['trainable_parameters']:,}"),
        ("steps/s (median)", f"{f['steps_per_s']:.3f}"),
        ("samples/s", f"{f['samples_per_s']:.3f}"),
        ("first step", f"{f['first_step_s']:.2f} s ({f['first_step_extra_s']:.2f} s over a steady step: compile, warm-up)"),
        ("time split (ms/step)", ", ".join(f"{k} {v:.1f}" for k, v in f["phase_ms"].items())),
        ("peak RSS", f"{f['peak_rss_mib']:.0f} MiB (training process: imports, load, train; model built apart)"),
        ("peak RSS, timed steps", "n/a" if f.get("window_peak_rss_mib") is None else
         f"{f['window_peak_rss_mib']:.0f} MiB (reset after the warmup steps: the training window alone)"),
    ]
    if "cuda_max_allocated_gib" in f:
        rows.append(("CUDA peak", f"{f['cuda_max_allocated_gib']:.2f} GiB allocated, {f['cuda_max_reserved_gib']:.2f} GiB reserved"))
    if f["tflop_per_step"] is not None:
        rows += [
            ("FLOP per step", f"{f['tflop_per_step'] * 1e3:.2f} GFLOP (forward + backward)"),
            ("achieved", f"{f['achieved_tflops'] * 1e3:.2f} GFLOP/s = {100 * f['achieved_tflops'] / f['matmul_peak_tflops']:.1f}% "
                         f"of the measured matmul peak ({f['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s)"),
        ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
