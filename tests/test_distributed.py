"""Two processes through accelerate (DDP on CPU with gloo): the scale-out path a multi-GPU run takes."""

import os
import shutil
import subprocess
import sys

import pytest
from diffusers import StableDiffusionPipeline


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
@pytest.mark.slow
def test_two_process_training(tiny_sd_dir, photos, tmp_path, free_port):
    out = tmp_path / "out"
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port), "-m", "dreambooth.cli", "train",
           "--model.path", str(tiny_sd_dir), "--concept.instance_dir", str(photos),
           "--concept.instance_prompt", "a photo of sks dog", "--concept.class_prompt", "a photo of a dog",
           "--prior.enabled", "--prior.num_class_images", "3", "--prior.num_inference_steps", "2",
           "--data.resolution", "32", "--data.min_size", "16", "--train.max_steps", "3",
           "--checkpoint.every_n_steps", "2", "--train.output_dir", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained 3 steps") == 2  # both ranks ran the loop
    # One process generated the class images; the other reused them (no duplicates, one manifest entry each).
    assert len(list((out / "class_images" / "0").glob("*.png"))) == 3
    assert len((out / "class_images" / "0" / "manifest.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step-000002", "step-000003"]
    StableDiffusionPipeline.from_pretrained(out)  # the main process exported a loadable pipeline
