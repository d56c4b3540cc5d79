"""diffusers' train_dreambooth.py (the peer) on the same model, photos and class images as bench.py.

The peer is another project's script, so it is not in this tree: pass its path with --peer-script (or
$PEER_SCRIPT). `bench/gpu_suite.sh --prepare` fetches the version our figures were measured with into
bench/peer-script/ (ignored by git; carried to the GPU machine), or get it yourself:

    curl -o train_dreambooth.py https://raw.githubusercontent.com/huggingface/diffusers/58eb52c0803ea9af3abec60841c2a093bdf1f951/examples/dreambooth/train_dreambooth.py

(the diffusers sdist and wheel do not include examples/). It needs torchvision; our own code does not.

The peer prints no per-step timings, so it runs twice, for --steps-a and --steps-b optimizer
steps; everything else (loading, class-image check, the final save) is the same in both runs, so

    steps/s = (steps_b - steps_a) / (wall_b - wall_a)

is its speed over steps a..b (R15 asks for steps 50-250). Its peak GPU memory is
torch.cuda.max_memory_allocated() read when the longer run exits.

    python bench/peer_bench.py --peer-script bench/peer-script/train_dreambooth.py --model-dir /tmp/sd15 \
        --mixed-precision bf16 --json peer.json   # GPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The commit whose examples/dreambooth/train_dreambooth.py the figures in bench/RESULTS.md were measured with, and
# that file's sha256: a different file still runs, and the figures record which one it was.
PEER_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"
PEER_SHA256 = "29a648820226e7df65bebd5e51fe09ab36cd0118ae13a2a83f59ff67534dee8a"
PEER_URL = f"https://raw.githubusercontent.com/huggingface/diffusers/{PEER_COMMIT}/examples/dreambooth/train_dreambooth.py"
# Runs the peer as __main__ and prints its CUDA peak as the last line.
WRAPPER = """
import atexit, json, runpy, sys, torch
def report():
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print("PEER_PEAK " + json.dumps({"cuda_max_allocated_bytes": peak}), flush=True)
atexit.register(report)
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def fetch_peer(dest: Path, source: str | None = None) -> bool:
    """Put the peer script at `dest`: a copy of `source` if given, else a download of PEER_URL.

    Returns False, having said why and what to do, when it cannot be had (no network to GitHub here).
    """
    try:
        if source:
            data = Path(source).read_bytes()
        else:
            from urllib.request import urlopen

            with urlopen(PEER_URL, timeout=60) as response:
                data = response.read()
    except OSError as e:
        print(f"peer script not fetched ({e}): download {PEER_URL} where GitHub is reachable and rerun with "
              f"PEER_SCRIPT=that-file; until then the suite skips r15-peer")
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 != PEER_SHA256:  # still usable; the figures record the hash
        print(f"note: {dest} (sha256 {sha256[:12]}) is not the commit {PEER_COMMIT[:7]} file bench/RESULTS.md measured")
    print(f"peer script: {dest} ({len(data)} bytes)")
    return True


def run_peer(args, steps: int, out: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-c", WRAPPER, str(args.peer_script),
           "--pretrained_model_name_or_path", str(args.model_dir),
           "--instance_data_dir", str(args.photos), "--instance_prompt", "a photo of sks dog",
           "--output_dir", str(out), "--resolution", str(args.resolution),
           "--train_batch_size", "1", "--learning_rate", "1e-6", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--max_train_steps", str(steps), "--checkpointing_steps", str(10**6), "--seed", "0",
           "--mixed_precision", args.mixed_precision]
    if args.prior:
        cmd += ["--with_prior_preservation", "--class_data_dir", str(args.class_dir), "--class_prompt", "a photo of a dog",
                "--num_class_images", "5"]
    if args.train_text_encoder:
        cmd += ["--train_text_encoder"]
    cmd += args.extra
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"the peer failed ({steps} steps):\n{proc.stderr[-3000:]}")
    peak = next((json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("PEER_PEAK ")), {})
    return wall, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-script", type=Path, default=os.environ.get("PEER_SCRIPT") or None,
                   help="diffusers' examples/dreambooth/train_dreambooth.py (default: $PEER_SCRIPT)")
    p.add_argument("--model-dir", type=Path, required=True, help="a model folder bench.py built (--model-dir)")
    p.add_argument("--work", type=Path, default=Path("/tmp/peer-bench"))
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps-a", type=int, default=50)
    p.add_argument("--steps-b", type=int, default=250)
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--no-prior", dest="prior", action="store_false")
    p.add_argument("--no-text-encoder", dest="train_text_encoder", action="store_false")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="more peer flags, after --")
    args = p.parse_args()
    if args.peer_script is None or not args.peer_script.is_file():
        p.error(f"--peer-script: {args.peer_script or 'not given'} is not a file; pass diffusers' "
                f"examples/dreambooth/train_dreambooth.py (bench/gpu_suite.sh --prepare fetches it, or {PEER_URL})")
    sha256 = hashlib.sha256(args.peer_script.read_bytes()).hexdigest()
    from dreambooth.tiny import write_photos

    args.photos, args.class_dir = args.work / "photos", args.work / "class"
    write_photos(args.photos, 5, seed=0, size=args.resolution)  # the same photos and class images as bench.py's
    write_photos(args.class_dir, 5, seed=1, size=args.resolution)
    wall_a, _ = run_peer(args, args.steps_a, args.work / "out-a")
    wall_b, peak = run_peer(args, args.steps_b, args.work / "out-b")
    peer = f"diffusers examples/dreambooth/train_dreambooth.py @{PEER_COMMIT[:7]}" if sha256 == PEER_SHA256 else str(args.peer_script)
    figures = {"peer": peer, "peer_sha256": sha256, "resolution": args.resolution,
               "mixed_precision": args.mixed_precision, "prior": args.prior, "text_encoder": args.train_text_encoder,
               "steps": [args.steps_a, args.steps_b], "wall_s": [wall_a, wall_b],
               "steps_per_s": (args.steps_b - args.steps_a) / (wall_b - wall_a),
               "cuda_max_allocated_gib": peak.get("cuda_max_allocated_bytes") and peak["cuda_max_allocated_bytes"] / 2**30}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
