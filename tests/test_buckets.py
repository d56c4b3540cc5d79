"""Aspect-ratio buckets: the tables, the assignment, one bucket per micro-batch, a data order that stays a
pure function of (seed, position), disjoint processes, and crops that keep an off-centre subject."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_sdxl import make_cfg as sdxl_cfg
from test_train import _final_weights, make_cfg, straight_and_resumed

from dreambooth.cli import main
from dreambooth.config import ConceptConfig, DataConfig
from dreambooth.data.buckets import (bucket_sizes, bucket_table, buckets_for, class_image_counts, nearest_bucket,
                                     uses_buckets)
from dreambooth.data.dataset import BucketOrder, DataOrder, DreamBoothData, Example, Positions, subject_examples
from dreambooth.errors import DreamBoothError
from dreambooth.models.load import FAMILIES
from dreambooth.train import train

# SD 1.x at 512 px: step 64 (latent factor 8 x 8), sides 256..1024. Each row: for width w the largest
# multiple of 64 with w * h <= 512^2, capped at 1024 (by hand: w=320 -> 262144/320 = 819.2 -> 768).
GOLDEN_SD_512 = [(1024, 256), (960, 256), (896, 256), (832, 256), (768, 320), (704, 320), (640, 384), (576, 448),
                 (512, 512), (448, 576), (384, 640), (320, 704), (320, 768), (256, 832), (256, 896), (256, 960),
                 (256, 1024)]
# DeepFloyd IF stage I at 64 px works in pixels: latent factor 1, step 8, sides 32..128.
GOLDEN_IF_64 = [(128, 32), (120, 32), (112, 32), (104, 32), (96, 40), (88, 40), (80, 48), (72, 56), (64, 64),
                (56, 72), (48, 80), (40, 88), (40, 96), (32, 104), (32, 112), (32, 120), (32, 128)]
# The tiny test models (VAE factor 2) at 32 px: step 16, sides 16..64.
GOLDEN_TINY_32 = [(64, 16), (48, 16), (32, 32), (16, 48), (16, 64)]


@pytest.mark.parametrize("resolution, step, sides, golden", [
    (512, 64, (256, 1024), GOLDEN_SD_512), (64, 8, (32, 128), GOLDEN_IF_64), (32, 16, (16, 64), GOLDEN_TINY_32)])
def test_bucket_tables(resolution, step, sides, golden):
    sizes = bucket_sizes(resolution, step, *sides)
    assert sizes == golden
    for h, w in sizes:
        assert h % step == 0 and w % step == 0 and h * w <= resolution ** 2
        assert sides[0] <= min(h, w) and max(h, w) <= sides[1]
        assert (w, h) in sizes  # the table is symmetric: every wide bucket has its tall twin


def test_sdxl_table_holds_the_papers_common_buckets():
    """SDXL at 1024 px (Podell et al. 2023, appendix: the multi-aspect buckets) with our defaults from DataConfig."""
    sizes = bucket_table(DataConfig(resolution=1024), resolution_step=8)
    for size in [(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (640, 1536), (512, 2048), (1152, 896), (1536, 640)]:
        assert size in sizes
    assert sizes[0] == (2048, 512) and sizes[-1] == (512, 2048)


def test_assignment_golden_table():
    """Photo (width, height) -> SD 512 bucket (height, width), nearest in log aspect ratio."""
    sizes = bucket_sizes(512, 64, 256, 1024)
    expected = {(4032, 3024): (448, 576), (3024, 4032): (576, 448), (1920, 1080): (384, 640), (1000, 1000): (512, 512),
                (800, 1200): (640, 384), (6000, 1000): (256, 1024), (500, 1000): (704, 320), (1000, 500): (320, 704),
                (1100, 1000): (512, 512), (1200, 1000): (448, 576)}
    assert {photo: nearest_bucket(*photo, sizes) for photo in expected} == expected
    # by hand for 2:3 portrait: log(2/3) = -0.405; 384/640 -> log 0.6 = -0.511 (0.105 away); 448/576 -> -0.251 (0.154)
    assert abs(math.log(384 / 640) - math.log(2 / 3)) < abs(math.log(448 / 576) - math.log(2 / 3))


def test_bucket_table_defaults_and_errors():
    assert bucket_table(DataConfig(resolution=512), 8) == GOLDEN_SD_512
    assert bucket_table(DataConfig(resolution=32), 2) == GOLDEN_TINY_32
    with pytest.raises(DreamBoothError, match=r"data.resolution to be a multiple of 64.*got 520; try 512"):
        bucket_table(DataConfig(resolution=520), 8)
    with pytest.raises(DreamBoothError, match=r"data.bucket_min_side must be a positive multiple of 64 .*, got 200; try 192"):
        bucket_table(DataConfig(resolution=512, bucket_min_side=200), 8)
    with pytest.raises(DreamBoothError, match=r"data.bucket_min_side \(576\) <= data.resolution \(512\)"):
        bucket_table(DataConfig(resolution=512, bucket_min_side=576), 8)
    assert bucket_table(DataConfig(resolution=32, bucket_step=8, bucket_min_side=16), 4) == [
        (64, 16), (56, 16), (48, 16), (40, 24), (32, 32), (24, 40), (16, 48), (16, 56), (16, 64)]  # the miniature world's
    with pytest.raises(DreamBoothError, match=r"data.bucket_step must be a positive multiple of 4 .* got 6; try 32"):
        bucket_table(DataConfig(resolution=32, bucket_step=6), 4)


def test_bucket_settings_without_buckets_are_an_error():
    assert buckets_for(DataConfig(resolution=32), FAMILIES["sd"], 2) is None
    assert buckets_for(DataConfig(resolution=32), FAMILIES["sdxl"], 2) == GOLDEN_TINY_32
    with pytest.raises(DreamBoothError, match="data.bucket_step is set but buckets are off.*data.buckets=true"):
        buckets_for(DataConfig(resolution=32, bucket_step=8), FAMILIES["sd"], 2)


def test_default_is_on_for_sdxl_only():
    assert [uses_buckets(DataConfig(), FAMILIES[name]) for name in ("sd", "sdxl", "if", "if-ii")] == [False, True, False, False]
    assert uses_buckets(DataConfig(buckets=True), FAMILIES["sd"]) and not uses_buckets(DataConfig(buckets=False), FAMILIES["sdxl"])


def test_class_image_counts():
    subject = [(512, 512)] * 5 + [(384, 640)] * 2 + [(640, 384)]
    # 100 x (5, 2, 1) / 8 = 62.5, 25, 12.5: the tied remainders go to the first bucket listed (square)
    assert class_image_counts(subject, 100) == {(384, 640): 25, (512, 512): 63, (640, 384): 12}
    assert class_image_counts(subject, 2) == {(384, 640): 1, (512, 512): 1, (640, 384): 1}  # at least one per bucket


# ---- the order ------------------------------------------------------------------------------

SUBJECT = [(32, 32)] * 5 + [(16, 48)] * 3 + [(48, 16)]
KLASS = [(32, 32)] * 4 + [(16, 48)] * 2 + [(48, 16)] * 2


def test_every_micro_batch_is_one_bucket_and_each_bucket_keeps_its_own_unbucketed_order():
    order = BucketOrder(SUBJECT, KLASS, batch_size=2, seed=0)
    # per bucket max(N_s, N_c) = 5, 3, 2 -> ceil(/2) = 3 + 2 + 1 micro-batches per round
    assert order.round_len == 6
    streams: dict = {}
    for m in range(4 * 6):
        bucket, pairs = order.batch(m)
        assert len(pairs) == 2
        assert all(SUBJECT[s] == bucket and KLASS[c] == bucket for s, c in pairs)
        streams.setdefault(bucket, []).extend(pairs)
    assert {b: len(p) for b, p in streams.items()} == {(32, 32): 24, (16, 48): 16, (48, 16): 8}  # 4 rounds x k_b x 2
    for k, bucket in enumerate(sorted(streams)):
        subject = [i for i, s in enumerate(SUBJECT) if s == bucket]
        klass = [i for i, s in enumerate(KLASS) if s == bucket]
        own = DataOrder(len(subject), len(klass), seed=7_919 * k)  # the bucket's stream: DataOrder pairing and epochs
        assert streams[bucket] == [(subject[s], klass[c]) for s, c in map(own.pair, range(len(streams[bucket])))]


def test_one_bucket_is_exactly_the_unbucketed_order():
    """Square photos: buckets on or off give the same batches (so SDXL's default keeps its golden losses)."""
    subject = _examples([(40, 40), (44, 42), (36, 36), (50, 50), (40, 41)], "a photo of sks dog")
    klass = _examples([(40, 40), (38, 38), (45, 45)], "a photo of a dog")
    for batch_size in (1, 2, 3):
        on = DreamBoothData(subject, klass, DATA, 5, Positions(batch_size), buckets=bucket_table(DATA, 2))
        off = DreamBoothData(subject, klass, DATA, 5, Positions(batch_size))
        for step in range(7):
            a, b = on.micro_batch(step, 0, with_pixels=True), off.micro_batch(step, 0, with_pixels=True)
            assert a.indices == b.indices and torch.equal(a.pixels, b.pixels) and a.crops == b.crops


def test_bucket_order_is_a_pure_function_of_seed_and_position():
    a = [BucketOrder(SUBJECT, KLASS, 2, seed=3).batch(m) for m in range(20)]
    jumping = BucketOrder(SUBJECT, KLASS, 2, seed=3)
    assert [jumping.batch(m) for m in reversed(range(20))] == a[::-1]  # across epochs, backwards
    assert a != [BucketOrder(SUBJECT, KLASS, 2, seed=4).batch(m) for m in range(20)]
    assert [b for b, _ in a[:6]] != [b for b, _ in a[6:12]]  # each round deals the buckets in a new order


def _image(width, height, color=(90, 120, 200)):
    return Image.new("RGB", (width, height), color)


def _examples(shapes, prompt):
    return [Example(path=None, prompt=prompt, image=_image(w, h, (i * 20 % 255, 80, 160))) for i, (w, h) in enumerate(shapes)]


PHOTOS = [(40, 40), (44, 40), (40, 42), (96, 32), (90, 30), (100, 36), (30, 90), (32, 32)]  # (width, height)
DATA = DataConfig(resolution=32, min_size=16)


def test_two_processes_take_disjoint_micro_batches_of_one_bucket():
    """What each of two processes trains on equals the one-process stream at its own positions, never the other's."""
    subject = _examples(PHOTOS, "a photo of sks dog")
    klass = _examples([(40, 40), (96, 32), (30, 90), (36, 36), (99, 33)], "a photo of a dog")
    buckets = bucket_table(DATA, 2)
    single = DreamBoothData(subject, klass, DATA, seed=1, positions=Positions(batch_size=2), buckets=buckets)
    ranks = [DreamBoothData(subject, klass, DATA, seed=1, positions=Positions(2, 1, 2, r), buckets=buckets) for r in (0, 1)]
    taken = set()
    for step in range(6):
        for rank, data in enumerate(ranks):
            batch = data.micro_batch(step, 0, with_pixels=True)
            first = data.positions.first(step, 0)
            assert first not in taken
            taken.add(first)
            expected = single.batch(first, 2, with_pixels=True)
            assert batch.indices == expected.indices and torch.equal(batch.pixels, expected.pixels)
            h, w = batch.target_size
            assert batch.pixels.shape == (4, 3, h, w)  # 2 subject + 2 class, one shape
            assert {data.sizes[k][i] for k, i in batch.indices} == {(h, w)}
    assert taken == set(range(0, 24, 2))  # 6 steps x 2 processes x batch 2: every position once


def test_class_images_pair_within_the_subject_bucket_and_a_missing_bucket_is_an_error():
    subject = _examples(PHOTOS, "a photo of sks dog")
    buckets = bucket_table(DATA, 2)
    data = DreamBoothData(subject, _examples([(40, 40), (200, 60), (30, 90)], "c"), DATA, 0, buckets=buckets)
    assert data.sizes["class"] == [(32, 32), (16, 48), (48, 16)]  # 200x60 is 3.3:1: nearest used bucket is 3:1
    square_only = _examples([(40, 40), (50, 50)], "c")
    for e in square_only:
        e.path = Path("/class/x.png")
    with pytest.raises(DreamBoothError, match=r"no class image in /class falls in the bucket\(s\) 16x48, 48x16"):
        DreamBoothData(subject, square_only, DATA, 0, buckets=buckets)


def _subject_photo(width, height, box):
    """A grey frame with a red subject square at `box` (left, top, right, bottom)."""
    image = _image(width, height, (128, 128, 128))
    image.paste((255, 0, 0), box)
    return image


def _red_fraction(pixels: torch.Tensor) -> float:
    red = (pixels[0] > 0.8) & (pixels[1] < -0.8)  # (H, W): pure red in [-1, 1]
    return float(red.float().mean())


def test_crops_keep_an_off_centre_subject():
    """A wide frame with the subject at the far left and a tall one with it at the bottom: buckets keep all of
    it (its share of the crop is what it was in the photo), the square centre crop cuts it away."""
    wide = _subject_photo(96, 32, (4, 8, 20, 24))  # 16 x 16 subject in 96 x 32: 1/12 of the photo
    tall = _subject_photo(32, 96, (8, 76, 24, 92))
    subject = [Example(None, "a photo of sks dog", wide), Example(None, "a photo of sks dog", tall)]
    bucketed = DreamBoothData(subject, [], DATA, 0, buckets=bucket_table(DATA, 2))
    square = DreamBoothData(subject, [], DATA, 0)
    for i in range(2):
        kept = bucketed.image("subject", i)
        assert kept.pixels.shape[1:] in {(16, 48), (48, 16)}
        assert _red_fraction(kept.pixels) == pytest.approx(1 / 12, abs=0.01)
        assert _red_fraction(square.image("subject", i).pixels) == 0.0  # the centre crop lost the subject
    # the recorded geometry is what SDXL's time ids get: the original (height, width) and a (0, 0) crop
    assert bucketed.image("subject", 0).original_size == (32, 96) and bucketed.image("subject", 0).crop_top_left == (0, 0)


def test_bucketed_batches_need_whole_micro_batches():
    data = DreamBoothData(_examples(PHOTOS, "p"), [], DATA, 0, positions=Positions(batch_size=2), buckets=bucket_table(DATA, 2))
    with pytest.raises(ValueError, match="multiples of 2"):
        data.batch(1, 2, with_pixels=False)


# ---- training with buckets --------------------------------------------------------------------

def write_mixed_photos(folder: Path) -> Path:
    """Six photos in three shapes, the subject (a red square) off-centre in the wide and tall frames."""
    folder.mkdir(parents=True)
    for i, (w, h, box) in enumerate([(40, 40, (12, 12, 28, 28)), (44, 40, (10, 10, 30, 30)), (96, 32, (4, 8, 20, 24)),
                                     (90, 30, (66, 6, 84, 24)), (32, 96, (8, 76, 24, 92)), (30, 90, (6, 2, 24, 20))]):
        photo = _subject_photo(w, h, box)
        photo.putpixel((i, i), (i * 40, 0, 255))  # no two photos alike
        photo.save(folder / f"photo_{i:02d}.png")
    return folder


def test_sdxl_trains_a_mixed_aspect_folder_in_buckets_by_default(tiny_sdxl_dir, tmp_path, caplog):
    photos = write_mixed_photos(tmp_path / "mixed")
    (photos / "photo_03.txt").write_text("a photo of a dog on the left")  # a caption without the identifier
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="dreambooth"):
        result = train(sdxl_cfg(tiny_sdxl_dir, photos, out, prior={"num_class_images": 3}, train={"max_steps": 2},
                                text_encoder_2={"train": False, "lr": None}))
    # train's short doctor report: the buckets, and the caption that lacks the identifier
    assert "doctor: 6 photos; buckets 32x32: 2, 16x48: 2, 48x16: 2" in caplog.text
    assert "photo_03.png: caption photo_03.txt does not contain the identifier 'sks'" in caplog.text
    assert sorted(result.losses) == [1, 2] and all(math.isfinite(v) for v in result.losses.values())
    # class images generated at the bucket sizes they are used at: 3 split over 2 + 2 + 2 photos -> 1 each
    folders = sorted(p.name for p in (out / "class_images" / "0").iterdir())
    assert folders == ["16x48", "32x32", "48x16"]
    for name in folders:
        h, w = map(int, name.split("x"))
        (image,) = (out / "class_images" / "0" / name).glob("*.png")
        assert Image.open(image).size == (w, h)


def test_resume_is_exact_with_buckets(tiny_sd_dir, tmp_path, monkeypatch):
    """SD with data.buckets=true, random crops and flips, accumulation, prior: 4 steps == 2, a crash, a resume, 2."""
    photos = write_mixed_photos(tmp_path / "mixed")
    settings = dict(train={"max_steps": 4, "gradient_accumulation_steps": 2}, checkpoint={"every_n_steps": 2},
                    data={"random_flip": True, "center_crop": False, "buckets": True}, text_encoder={"train": False},
                    prior={"num_class_images": 3})
    continuous, resumed = straight_and_resumed(tiny_sd_dir, photos, tmp_path, monkeypatch, settings, crash_at=2)
    assert [resumed.losses[s] for s in (3, 4)] == [continuous.losses[s] for s in (3, 4)]  # bitwise
    a, b = _final_weights(tmp_path / "a", "full"), _final_weights(tmp_path / "b", "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latent_cache_works_per_bucket(tiny_sd_dir, tmp_path):
    """Cached VAE posteriors (one per photo, at its bucket size) give the losses of encoding every step."""
    photos = write_mixed_photos(tmp_path / "mixed")
    common = dict(text_encoder={"train": False}, train={"max_steps": 3}, data={"buckets": True}, prior={"num_class_images": 3})
    cached = train(make_cfg(tiny_sd_dir, photos, tmp_path / "c", memory={"cache_latents": True}, **common))
    shutil.copytree(tmp_path / "c" / "class_images", tmp_path / "u" / "class_images")
    uncached = train(make_cfg(tiny_sd_dir, photos, tmp_path / "u", memory={"cache_latents": False}, **common))
    torch.testing.assert_close(torch.tensor(list(cached.losses.values())), torch.tensor(list(uncached.losses.values())),
                               rtol=1e-5, atol=1e-6)


def test_class_images_command_generates_at_the_bucket_sizes(tiny_sd_dir, tmp_path, capsys):
    photos = write_mixed_photos(tmp_path / "mixed")
    argv = ["class-images", "--model.path", str(tiny_sd_dir), "--concept.instance_dir", str(photos),
            "--concept.instance_prompt", "a photo of sks dog", "--concept.class_prompt", "a photo of a dog",
            "--concept.class_dir", str(tmp_path / "dogs"), "--prior.num_class_images", "4",
            "--prior.num_inference_steps", "2", "--data.resolution", "32", "--data.min_size", "16", "--data.buckets"]
    assert main(argv) == 0
    assert "4 class images" in capsys.readouterr().out  # 4 x (2, 2, 2) / 6 = 1.33 each; the remainder goes to the bucket met first (photo_00 is square)
    sizes = {p.parent.name: Image.open(p).size for p in (tmp_path / "dogs").glob("*/*.png")}
    assert sorted(p.parent.name for p in (tmp_path / "dogs").glob("*/*.png")) == ["16x48", "32x32", "32x32", "48x16"]
    assert sizes == {"16x48": (48, 16), "32x32": (32, 32), "48x16": (16, 48)}  # PIL sizes are (width, height)


TWO_PROCESS_SCRIPT = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
from dreambooth.config import ConceptConfig, DataConfig
from dreambooth.data.buckets import bucket_table
from dreambooth.data.dataset import DreamBoothData, Positions, subject_examples

accelerator = Accelerator()
data = DataConfig(resolution=32, min_size=16, random_flip=True)
subject = subject_examples([ConceptConfig(instance_dir=sys.argv[1], instance_prompt="a photo of sks dog")], data)
stream = DreamBoothData(subject, [], data, 0, Positions(2, 2, accelerator.num_processes, accelerator.process_index),
                        buckets=bucket_table(data, 2))
rows = []
for step in range(5):
    for micro in range(2):
        batch = stream.micro_batch(step, micro, with_pixels=True)
        rows.append({"first": stream.positions.first(step, micro), "indices": batch.indices, "size": batch.target_size,
                     "pixels": float(batch.pixels.double().sum())})
Path(sys.argv[2], f"rank{accelerator.process_index}.json").write_text(json.dumps(rows))
"""


@pytest.mark.slow
def test_two_processes_launched_take_disjoint_positions_with_buckets(tmp_path, free_port):
    """Two real processes (torchrun, as `accelerate launch` starts them): each takes its own positions, each
    micro-batch is one bucket, and together they see exactly the one-process stream."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed")
    photos = write_mixed_photos(tmp_path / "mixed")
    script = tmp_path / "stream.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port), str(script), str(photos),
                             str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    firsts = [row["first"] for rows in ranks for row in rows]
    assert sorted(firsts) == list(range(0, 5 * 2 * 2 * 2, 2))  # 5 steps x 2 micro x 2 processes x batch 2, once each
    data = DataConfig(resolution=32, min_size=16, random_flip=True)
    subject = subject_examples([ConceptConfig(instance_dir=str(photos), instance_prompt="a photo of sks dog")], data)
    single = DreamBoothData(subject, [], data, 0, Positions(2), buckets=bucket_table(data, 2))
    for row in ranks[0] + ranks[1]:
        expected = single.batch(row["first"], 2, with_pixels=True)
        assert [tuple(k) for k in row["indices"]] == expected.indices and tuple(row["size"]) == expected.target_size
        assert {single.sizes[k][i] for k, i in expected.indices} == {expected.target_size}
        assert row["pixels"] == float(expected.pixels.double().sum())
