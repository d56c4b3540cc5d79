"""`dreambooth doctor` on the awkward cases: duplicates, blur, tiny and rotated photos, palette PNGs, captions
without the identifier, class-folder provenance; the JSON report, the exit status and the contact sheet."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dreambooth.cli import main
from dreambooth.config import DataConfig
from dreambooth.doctor import BLUR_THRESHOLD, examine_folder, laplacian_variance

# The tiny models' geometry: 32 px, latent factor 2 -> bucket step 16, buckets 64x16 .. 16x64.
ARGS = ["--resolution", "32", "--latent-factor", "2", "--min-size", "16", "--buckets", "true", "--identifier", "sks"]


def noise(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def awkward(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        noise(64, 64, i).save(folder / f"sharp_{i}.png")
    shutil.copy(folder / "sharp_0.png", folder / "sharp_0_copy.png")  # exact duplicate
    brighter = np.asarray(noise(64, 64, 1)).astype(int) + 6
    Image.fromarray(np.clip(brighter, 0, 255).astype(np.uint8)).save(folder / "sharp_1_edit.png")  # near duplicate
    noise(64, 64, 10).filter(ImageFilter.GaussianBlur(3)).save(folder / "blurry.png")
    noise(20, 20, 11).save(folder / "tiny.png")  # fills a 32x32 bucket only enlarged x1.6
    noise(10, 10, 12).save(folder / "too_small.png")  # below data.min_size=16: training refuses it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": stored 60 x 30, upright 30 x 60
    noise(60, 30, 13).save(folder / "rotated.jpg", exif=exif, quality=95)
    noise(64, 64, 14).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    (folder / "sharp_2.txt").write_text("a photo of sks dog on a sofa")
    (folder / "palette.txt").write_text("a photo of a dog on grass")  # no identifier
    return folder


def test_doctor_reports_every_awkward_case(awkward, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["doctor", str(awkward), *ARGS, "--json", "--contact-sheet", str(sheet)]) == 1  # it found errors
    report = json.loads(capsys.readouterr().out)
    images = {r["file"]: r for r in report["images"]}
    assert sorted(images) == ["blurry.png", "palette.png", "rotated.jpg", "sharp_0.png", "sharp_0_copy.png", "sharp_1.png",
                              "sharp_1_edit.png", "sharp_2.png", "tiny.png", "too_small.png"]
    assert report["ok"] is False and report["blur_threshold"] == BLUR_THRESHOLD and report["buckets"] is True

    def problems(name):
        return " | ".join(images[name]["errors"] + images[name]["warnings"])

    clean = ["sharp_0.png", "sharp_1.png", "sharp_2.png"]
    assert [problems(n) for n in clean] == ["", "", ""]
    # duplicates: the copy is an error, the edited photo a warning
    assert report["exact_duplicates"] == [["sharp_0.png", "sharp_0_copy.png"]]
    assert images["sharp_0_copy.png"]["errors"] == ["exact duplicate of sharp_0.png (same pixels): it would train twice "
                                                    "as often; remove it"]
    assert [(a, b) for a, b, _ in report["near_duplicates"]] == [("sharp_1.png", "sharp_1_edit.png")]
    assert "near duplicate of sharp_1.png" in problems("sharp_1_edit.png") and not images["sharp_1_edit.png"]["errors"]
    # blur, with the threshold stated in the message
    assert images["blurry.png"]["blur"] < BLUR_THRESHOLD < min(images[n]["blur"] for n in clean)
    assert f"< {BLUR_THRESHOLD:g}" in problems("blurry.png")
    # too small: for its bucket (a warning, with the size to use), and below data.min_size (an error)
    assert images["tiny.png"]["upscale"] == 1.6 and "use a photo of at least 32x32 pixels" in problems("tiny.png")
    assert "below data.min_size=16" in images["too_small.png"]["errors"][0]
    # the EXIF rotation is applied before the bucket is chosen: 60 x 30 stored -> 30 x 60 upright -> the 1:3 bucket
    rotated = images["rotated.jpg"]
    assert rotated["exif_rotated"] is True and (rotated["width"], rotated["height"]) == (30, 60)
    assert rotated["bucket"] == [48, 16] and images["sharp_0.png"]["exif_rotated"] is False
    # mode conversion and captions
    assert images["palette.png"]["mode"] == "P" and images["palette.png"]["converted"] is True
    assert images["sharp_0.png"]["converted"] is False
    assert images["sharp_2.png"]["caption_has_identifier"] is True
    assert images["palette.png"]["caption_has_identifier"] is False and "identifier 'sks'" in problems("palette.png")
    assert [e.split(":")[0] for e in report["errors"]] == ["sharp_0_copy.png", "too_small.png"]  # all else: warnings
    # the contact sheet: one block per bucket, never inside the photo folder
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width > 8 * 128
    assert report["contact_sheet"] == str(sheet)


def test_clean_folder_passes_and_the_text_report_names_the_threshold(tmp_path, capsys):
    folder = tmp_path / "clean"
    folder.mkdir()
    for i in range(3):
        noise(64 + 32 * i, 64, i).save(folder / f"p{i}.png")
    assert main(["doctor", str(folder), *ARGS]) == 0
    out = capsys.readouterr().out
    assert "3 photos at resolution 32, buckets on, blur threshold 100" in out and "0 error(s), 0 warning(s)" in out
    assert (tmp_path / "clean-contact-sheet.png").is_file()  # beside the folder by default, not in it
    assert sorted(p.name for p in folder.iterdir()) == ["p0.png", "p1.png", "p2.png"]


def test_unreadable_photo_is_an_error_and_a_missing_folder_a_one_line_failure(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    noise(40, 40, 0).save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"not a png")
    report, crops = examine_folder(folder, DataConfig(resolution=32, min_size=16), None)
    assert [r.file for r in report.images if r.errors] == ["broken.png"] and "broken.png" in report.errors[0]
    assert list(crops) == ["ok.png"] and report.images[1].bucket == (32, 32)  # buckets off: the square
    assert main(["doctor", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_without_buckets_a_wide_photo_warns_that_the_square_crop_drops_its_ends(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    noise(96, 48, 0).save(folder / "wide.png")
    noise(44, 40, 1).save(folder / "nearly_square.png")
    report, _ = examine_folder(folder, DataConfig(resolution=32, min_size=16), None)
    assert report.warnings == ["wide.png: the square centre crop keeps only 50% of this 96x48 photo: check on the contact "
                               "sheet that the subject is in it, or train with data.buckets=true"]


def test_class_folder_provenance(tmp_path, awkward):
    managed = tmp_path / "class"
    (managed / "32x32").mkdir(parents=True)
    noise(32, 32, 0).save(managed / "32x32" / "class_00000_0123456789.png")
    noise(32, 32, 1).save(managed / "32x32" / "stray.png")
    entries = [{"file": "class_00000_0123456789.png", "prompt": "a dog", "size": [32, 32], "model": "x"},
               {"file": "class_00001_abcdefabcd.png", "prompt": "a dog", "size": [32, 32], "model": "x"}]
    (managed / "32x32" / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    report, _ = examine_folder(awkward, DataConfig(resolution=32, min_size=16), None, class_dir=str(managed))
    (folder,) = report.class_folder["folders"]
    assert report.class_folder["status"] == "stale"
    assert folder["missing_files"] == ["class_00001_abcdefabcd.png"] and folder["unlisted_images"] == ["stray.png"]
    assert len(report.class_folder["warnings"]) == 2

    own = tmp_path / "own"
    own.mkdir()
    noise(32, 32, 2).save(own / "dog.png")
    report, _ = examine_folder(awkward, DataConfig(resolution=32, min_size=16), None, class_dir=str(own))
    assert report.class_folder["status"] == "user-supplied"
    report, _ = examine_folder(awkward, DataConfig(resolution=32, min_size=16), None, class_dir=str(tmp_path / "none"))
    assert report.class_folder["status"] == "absent"


def test_laplacian_variance_by_hand():
    """A single white pixel on black: the Laplacian is -4*255 there and 255 at its four neighbours."""
    image = Image.new("L", (5, 5))
    image.putpixel((2, 2), 255)
    lap = np.zeros((3, 3))
    lap[1, 1], lap[0, 1], lap[1, 0], lap[1, 2], lap[2, 1] = -4 * 255, 255, 255, 255, 255
    assert laplacian_variance(image.convert("RGB")) == pytest.approx(lap.var())
