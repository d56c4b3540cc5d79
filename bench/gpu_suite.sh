#!/usr/bin/env bash
# Every GPU figure issue 16 asks for, in one run: R15 (SD 1.5, 512 px, UNet + text encoder,
# prior preservation 1+1, latents cached) for ours (default, fast, low-memory, fp16, fp32) and for
# diffusers' train_dreambooth.py on the same model and data; SDXL LoRA and full UNet at 1024 px.
# Writes $OUT/gpu_suite.json and $OUT/gpu_suite.md (OUT defaults to bench/out), one row per run.
#
#   bench/gpu_suite.sh --prepare   # here (package registries reachable): the wheels the GPU image lacks -> bench/wheels/,
#                                  # and the peer script -> bench/peer-script/ (PEER_SCRIPT=FILE copies FILE instead)
#   bench/gpu_suite.sh             # on the GPU machine: the device tool's run with carry=["bench/wheels", "bench/peer-script"]
#   bench/gpu_suite.sh --dry-run   # CPU, tiny models, 2 timed steps each: checks the whole chain in about 3 minutes
#   ROWS="r15-default r15-peer" bench/gpu_suite.sh   # only these rows (to split the suite over several calls)
#
# The peer is diffusers' examples/dreambooth/train_dreambooth.py, another project's script, so it is not in this
# tree. No package holds it (the diffusers sdist and wheel leave out examples/), so --prepare downloads it from
# GitHub at the commit bench/RESULTS.md measured (bench/peer_bench.py's PEER_URL); where GitHub is unreachable,
# fetch that file elsewhere and pass PEER_SCRIPT=FILE. Both folders are ignored by git. Without the script, or
# without torchvision (which it needs), the r15-peer row is skipped and the log says so.
#
# The GPU image has torch (CUDA), transformers, accelerate, peft and torchvision but not diffusers;
# the wheels bring diffusers and importlib_metadata at the lock's versions, and torchao 0.18.0 for the
# optimizer comparison (bench/torchao_compare.py; 9.6 MB in all). bitsandbytes
# (43 MB) does not fit beside the work tree in the 64 MiB the machine takes, so the low-memory runs
# use bf16 moments instead of 8-bit ones (the row says so). xFormers is not in the image, and
# bench.py has no CUDA-graphs mode: those rows say "not measured" rather than guess.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
OUT=${OUT:-bench/out}
lock_version() { grep -i "^$1==" requirements.lock | cut -d= -f3; }

if [ "$mode" = "--prepare" ]; then
    rm -rf bench/wheels && mkdir -p bench/wheels
    python -m pip download -q --no-deps -d bench/wheels "diffusers==$(lock_version diffusers)" \
        "importlib_metadata==$(lock_version importlib_metadata)" torchao==0.18.0
    du -sh bench/wheels && ls bench/wheels
    rm -rf bench/peer-script
    python -c "import sys; sys.path.insert(0, 'bench'); import peer_bench; from pathlib import Path
peer_bench.fetch_peer(Path('bench/peer-script/train_dreambooth.py'), sys.argv[1] or None)" "${PEER_SCRIPT:-}"
    exit 0
fi

mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
start=$(date +%s)
if [ "$mode" = "--dry-run" ]; then
    device=cpu; sd=tiny; xl=tiny-sdxl; res=32; xres=32; warm=1; steps=2; peer_a=1; peer_b=3
    export OMP_NUM_THREADS=1; common="--device cpu --threads 1 --no-flops"
else
    device=cuda; sd=sd15; xl=sdxl; res=512; xres=1024; warm=50; steps=200; peer_a=50; peer_b=250
    common="--device cuda --no-flops"
    $PY -m pip install -q --no-index --no-deps bench/wheels/*.whl || { echo "wheels missing: run bench/gpu_suite.sh --prepare first"; exit 2; }
fi

# Fail in seconds, not minutes: everything imports and the device is there.
$PY - <<EOF || exit 2
import importlib, torch
for name in ("diffusers", "transformers", "accelerate", "peft", "safetensors", "dreambooth.train", "bench"):
    importlib.import_module(name)
assert "$device" == "cpu" or torch.cuda.is_available(), "no CUDA device"
print("imports ok; torch", torch.__version__, "device", torch.cuda.get_device_name() if "$device" == "cuda" else "cpu")
EOF
PEER_SCRIPT=${PEER_SCRIPT:-bench/peer-script/train_dreambooth.py}
if [ ! -f "$PEER_SCRIPT" ]; then
    peer_ok=0; peer_why="no peer script at $PEER_SCRIPT (bench/gpu_suite.sh --prepare fetches it; or PEER_SCRIPT=FILE)"
elif ! $PY -c "import torchvision" 2>/dev/null; then
    peer_ok=0; peer_why="torchvision is not installed here (the peer needs it; the GPU image has it)"
else
    peer_ok=1
fi
ao_ok=$($PY -c "import torchao.optim" 2>/dev/null && echo 1 || echo 0)

models=/tmp/gpu-suite-models
r15="--arch $sd --model-dir $models/$sd --resolution $res --train-text-encoder --prior --warmup $warm --steps $steps $common"
sdxl="--arch $xl --model-dir $models/$xl --resolution $xres --warmup $((warm / 10 + 1)) --steps $((steps / 10 + 1)) $common"
run() {  # name, seconds allowed, command...
    local name=$1 limit=$2; shift 2
    if [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]]; then return; fi
    echo "== $name ($(( $(date +%s) - start )) s in)"
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$name.log)"; tail -3 "$OUT/$name.log"; fi
}
run r15-default         600 $PY bench/bench.py $r15 --mixed-precision bf16 --json "$OUT/r15-default.json"
run r15-fast            600 $PY bench/bench.py $r15 --mixed-precision bf16 --preset fast --json "$OUT/r15-fast.json"
run r15-low-memory      600 $PY bench/bench.py $r15 --preset low-memory --moments-dtype bf16 --json "$OUT/r15-low-memory.json"
run r15-fp16            600 $PY bench/bench.py $r15 --mixed-precision fp16 --json "$OUT/r15-fp16.json"
run r15-fp32            600 $PY bench/bench.py $r15 --json "$OUT/r15-fp32.json"
if [ "$peer_ok" = 1 ]; then
    run r15-peer        900 $PY bench/peer_bench.py --peer-script "$PEER_SCRIPT" --model-dir "$models/$sd" --resolution $res \
                            --steps-a $peer_a --steps-b $peer_b --mixed-precision bf16 --work /tmp/gpu-suite-peer --json "$OUT/r15-peer.json"
else
    echo "== r15-peer skipped: $peer_why"
    echo "skipped: $peer_why" > "$OUT/r15-peer.log"  # the table's row points here
fi
run sdxl-lora           600 $PY bench/bench.py $sdxl --method lora --mixed-precision bf16 --gradient-checkpointing \
                            --offload-text-encoders --json "$OUT/sdxl-lora.json"
if [ "$ao_ok" = 1 ]; then
    run torchao-step    300 $PY bench/torchao_compare.py --skip-quality --device $device \
                            --values $([ "$device" = cuda ] && echo 400000000 || echo 2000000) --json "$OUT/torchao-step.json"
else
    echo "== torchao-step skipped: torchao is not installed here"
fi
run sdxl-full           600 $PY bench/bench.py $sdxl --preset low-memory --moments-dtype bf16 --offload-text-encoders \
                            --json "$OUT/sdxl-full.json"

# One table: the figures each run wrote, in run order.
$PY - "$OUT" "$mode" <<'EOF'
import json, sys
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
names = ["r15-default", "r15-fast", "r15-low-memory", "r15-fp16", "r15-fp32", "r15-peer", "sdxl-lora", "sdxl-full"]
rows = {n: json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").is_file()}
(out / "gpu_suite.json").write_text(json.dumps({"mode": mode, "runs": rows}, indent=2) + "\n")
lines = ["| run | arch / px | precision | steps/s | peak allocated (GiB) | note |", "|---|---|---|---|---|---|"]
for n in names:
    r = rows.get(n)
    if r is None:
        lines.append(f"| {n} | | | | | not run or failed: see {n}.log |")
        continue
    note = r.get("preset") or ""
    if r.get("moments_dtype") == "bf16":
        note += " (bf16 moments: bitsandbytes not carried)"
    lines.append(f"| {n} | {r.get('arch', 'sd15 (peer)')} / {r['resolution']} | {r['mixed_precision']} | "
                 f"{r['steps_per_s']:.2f} | {r.get('cuda_max_allocated_gib') or 0:.2f} | {note.strip()} |")
lines += ["| xformers | | | | | not measured: not in the GPU image |", "| CUDA graphs | | | | | not measured: no mode for it |"]
ao = out / "torchao-step.json"
if ao.is_file():  # one optimizer step over bf16 weights: ours against torchao's
    step = json.loads(ao.read_text())
    rows["torchao-step"] = step
    (out / "gpu_suite.json").write_text(json.dumps({"mode": mode, "runs": rows}, indent=2) + "\n")
    lines += ["", f"| optimizer step ({step['device']}) | ms | state bytes/weight |", "|---|---|---|"]
    lines += [f"| {name} | {r['seconds_per_step'] * 1000:.1f} | {r['state_bytes_per_weight']:.2f} |" for name, r in step["speed"].items()]
(out / "gpu_suite.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "suite finished in $(( $(date +%s) - start )) s; $OUT/gpu_suite.json, $OUT/gpu_suite.md"
