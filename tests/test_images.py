"""Tests for dreambooth.data.images: listing, loading odd files, captions, validation, crops.

Every image is written with PIL into `tmp_path`, so the tests need no assets and run in about a
second on CPU.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.data.images import (
    IMAGE_EXTENSIONS,
    image_files,
    list_images,
    load_image,
    load_images,
    read_caption,
    to_tensor,
)
from dreambooth.errors import DreamBoothError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def rgb(size=(32, 32), color=RED) -> Image.Image:
    return Image.new("RGB", size, color)


def noise(size=(64, 64), seed=0) -> Image.Image:
    """Random pixels: they do not compress, so truncating the file really cuts image data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def bands(colors, band=16, height=16) -> Image.Image:
    """Vertical colour bands, each `band` pixels wide, left to right."""
    image = Image.new("RGB", (band * len(colors), height))
    for i, color in enumerate(colors):
        image.paste(color, (i * band, 0, (i + 1) * band, height))
    return image


def pixel(image: Image.Image, xy=(0, 0)) -> tuple:
    return image.getpixel(xy)


# list_images


def test_extensions_are_lower_case():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ["b.png", "a.JPG", "c.webp", "d.tiff", ".hidden.png", "._a.jpg"]:
        save(tmp_path / name, rgb(), format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "b.txt").write_text("a caption")
    save(tmp_path / "sub" / "e.png", rgb())
    (tmp_path / "folder.png").mkdir()  # a folder with an image extension is not an image

    images = list_images(tmp_path)

    assert [p.name for p in images] == ["a.JPG", "b.png", "c.webp", "d.tiff"]
    assert all(p.is_absolute() for p in images)
    assert image_files(tmp_path) == images  # the one lister behind list_images, class images and the doctor
    assert image_files(tmp_path / "sub") == [tmp_path / "sub" / "e.png"]
    (tmp_path / "sub" / "e.png").unlink()
    assert image_files(tmp_path / "sub") == []  # no refusal: the callers word their own


def test_list_images_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DreamBoothError, match="does not exist") as info:
        list_images(missing, what="class")
    assert str(missing) in str(info.value)
    assert "class" in str(info.value)


def test_list_images_file_instead_of_folder(tmp_path):
    file = save(tmp_path / "one.png", rgb())
    with pytest.raises(DreamBoothError, match="is a file, not a folder") as info:
        list_images(file)
    assert str(file) in str(info.value)


def test_list_images_empty_folder(tmp_path):
    with pytest.raises(DreamBoothError, match="found 0 other file") as info:
        list_images(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert ".png" in str(info.value) and ".jpeg" in str(info.value)


def test_list_images_only_other_files_names_their_extensions(tmp_path):
    (tmp_path / "IMG_1.HEIC").write_bytes(b"x")
    (tmp_path / "IMG_2.heic").write_bytes(b"x")
    (tmp_path / "readme").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"x")  # hidden: not counted
    with pytest.raises(DreamBoothError) as info:
        list_images(tmp_path, what="instance")
    message = str(info.value)
    assert "No instance images in" in message and str(tmp_path) in message
    assert "found 3 other file(s)" in message
    assert ".heic" in message and "(no extension)" in message
    assert "\n" not in message


def test_list_images_only_in_sub_folder(tmp_path):
    save(tmp_path / "x" / "photo.jpg", rgb(), format="JPEG")
    with pytest.raises(DreamBoothError) as info:
        list_images(tmp_path)
    message = str(info.value)
    assert f"images must be directly in {tmp_path}".lower() in message.lower()
    assert f"not in sub-folders like {tmp_path / 'x'}" in message


# load_image: errors


def test_load_corrupt_bytes(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DreamBoothError, match="re-export it as PNG or JPEG, or remove it") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_text_renamed_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not a picture\n" * 10)
    with pytest.raises(DreamBoothError, match="not a recognised image format") as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_load_truncated_file(tmp_path, fmt, suffix):
    path = save(tmp_path / f"cut{suffix}", noise(), format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    Image.open(path).close()  # the header is intact: only a full decode can notice
    with pytest.raises(DreamBoothError, match="re-export it as PNG or JPEG") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_missing_file(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(DreamBoothError, match="does not exist") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_too_small(tmp_path):
    path = save(tmp_path / "tiny.png", rgb((48, 32)))
    with pytest.raises(DreamBoothError) as info:
        load_image(path, min_size=64)
    message = str(info.value)
    assert str(path) in message
    assert "48x32" in message and "64" in message
    assert "upscale" in message and "data.min_size" in message


def test_load_min_size_is_inclusive(tmp_path):
    path = save(tmp_path / "ok.png", rgb((48, 32)))
    assert load_image(path, min_size=32).size == (48, 32)


# load_image: mode conversion


def test_rgb_passes_through(tmp_path):
    image = noise((20, 10))
    loaded = load_image(save(tmp_path / "a.png", image))
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    np.testing.assert_array_equal(np.array(loaded), np.array(image))


def test_rgba_composited_onto_white(tmp_path):
    pixels = np.zeros((4, 8, 4), dtype=np.uint8)  # (H, W, RGBA)
    pixels[:, :4] = (0, 0, 0, 0)  # invisible black: must become white, not black
    pixels[:, 4:6] = (255, 0, 0, 255)  # opaque red
    pixels[:, 6:] = (0, 0, 255, 128)  # half-transparent blue
    loaded = load_image(save(tmp_path / "cutout.png", Image.fromarray(pixels, "RGBA")))
    assert loaded.mode == "RGB"
    assert pixel(loaded, (0, 0)) == WHITE
    assert pixel(loaded, (4, 0)) == RED
    r, g, b = pixel(loaded, (7, 0))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255


def test_la_composited_onto_white(tmp_path):
    image = Image.new("LA", (4, 2), (0, 0))
    image.putpixel((3, 0), (50, 255))
    loaded = load_image(save(tmp_path / "la.png", image))
    assert pixel(loaded, (0, 0)) == WHITE
    assert pixel(loaded, (3, 0)) == (50, 50, 50)


def palette_image() -> Image.Image:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    image.putpixel((3, 1), 1)
    return image


def test_palette(tmp_path):
    loaded = load_image(save(tmp_path / "p.png", palette_image()))
    assert loaded.mode == "RGB"
    assert pixel(loaded, (0, 0)) == (0, 0, 0)
    assert pixel(loaded, (3, 1)) == (10, 200, 30)


def test_palette_with_transparency(tmp_path):
    path = save(tmp_path / "pt.png", palette_image(), transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info["transparency"] == 0
    loaded = load_image(path)
    assert pixel(loaded, (0, 0)) == WHITE  # index 0 is transparent black
    assert pixel(loaded, (3, 1)) == (10, 200, 30)


def test_grayscale(tmp_path):
    loaded = load_image(save(tmp_path / "l.png", Image.new("L", (3, 3), 77)))
    assert loaded.mode == "RGB" and pixel(loaded) == (77, 77, 77)


def test_one_bit(tmp_path):
    image = Image.new("1", (4, 2), 0)
    image.putpixel((3, 0), 1)
    loaded = load_image(save(tmp_path / "bw.bmp", image))
    assert pixel(loaded, (0, 0)) == (0, 0, 0)
    assert pixel(loaded, (3, 0)) == WHITE


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    path = save(tmp_path / "print.jpg", cmyk, format="JPEG")
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    r, g, b = pixel(load_image(path), (8, 8))
    assert r > 230 and g < 30 and b < 30  # pure magenta + yellow ink is red


def test_sixteen_bit_png_scaled_by_bit_depth(tmp_path):
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    path = save(tmp_path / "scan.png", Image.fromarray(values))
    with Image.open(path) as check:
        assert check.mode == "I;16"
    loaded = load_image(path)
    gray = np.array(loaded)[0, :, 0]
    assert gray.tolist() == [0, 128, 255, 1]  # scaled, not clipped to 255


def test_sixteen_bit_big_endian_tiff(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values).convert("I").convert("I;16B")
    path = save(tmp_path / "scan.tif", image)
    with Image.open(path) as check:
        assert check.mode == "I;16B"
    assert np.array(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_thirty_two_bit_tiff_scaled_by_bit_depth(tmp_path):
    values = np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32)
    path = save(tmp_path / "deep.tif", Image.fromarray(values))
    with Image.open(path) as check:
        assert check.mode == "I"
    assert np.array(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_float_tiff(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = save(tmp_path / "float.tif", Image.fromarray(values))
    with Image.open(path) as check:
        assert check.mode == "F"
    assert np.array(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_applied(tmp_path):
    image = bands([RED, BLUE], band=20, height=20)  # 40x20: red left half, blue right half
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(tmp_path / "phone.jpg", image, format="JPEG", exif=exif, quality=95)
    with Image.open(path) as check:
        assert check.size == (40, 20)

    loaded = load_image(path)

    assert loaded.size == (20, 40)
    # Turning clockwise brings the left edge to the top.
    r, _, b = pixel(loaded, (10, 5))
    assert r > 200 and b < 50
    r, _, b = pixel(loaded, (10, 34))
    assert r < 50 and b > 200


# read_caption


def test_caption_present_and_stripped(tmp_path):
    image = save(tmp_path / "dog.png", rgb())
    (tmp_path / "dog.txt").write_text("  a photo of sks dog, on grass \n\n", encoding="utf-8")
    assert read_caption(image) == "a photo of sks dog, on grass"


def test_caption_absent(tmp_path):
    assert read_caption(save(tmp_path / "dog.png", rgb())) is None


def test_caption_with_bom(tmp_path):
    image = save(tmp_path / "dog.jpg", rgb(), format="JPEG")
    (tmp_path / "dog.txt").write_bytes("\ufeffun chien sks à Paris".encode("utf-8"))
    assert read_caption(image) == "un chien sks à Paris"


def test_caption_empty_is_error(tmp_path):
    image = save(tmp_path / "dog.png", rgb())
    (tmp_path / "dog.txt").write_text(" \n\t")
    with pytest.raises(DreamBoothError, match="is empty") as info:
        read_caption(image)
    assert str(tmp_path / "dog.txt") in str(info.value)


def test_caption_with_another_extension(tmp_path):
    image = save(tmp_path / "dog.png", rgb())
    (tmp_path / "dog.txt").write_text("the .txt one")
    assert read_caption(image, ".caption") is None
    (tmp_path / "dog.caption").write_bytes("\ufeff a sks dog \n".encode("utf-8"))
    assert read_caption(image, ".caption") == "a sks dog"
    (tmp_path / "dog.caption").write_bytes("à".encode("latin-1"))
    with pytest.raises(DreamBoothError, match="dog.caption is not UTF-8"):  # the same checks as .txt
        read_caption(image, ".caption")


def test_caption_not_utf8_is_error(tmp_path):
    image = save(tmp_path / "dog.png", rgb())
    (tmp_path / "dog.txt").write_bytes("un chien à Paris".encode("latin-1"))
    with pytest.raises(DreamBoothError, match="not UTF-8") as info:
        read_caption(image)
    assert str(tmp_path / "dog.txt") in str(info.value)


# load_images (what training uses to check and decode a folder in one go)


def test_load_images_lists_every_bad_file(tmp_path):
    good = save(tmp_path / "good.png", rgb((64, 64)))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    small = save(tmp_path / "small.png", rgb((64, 16)))
    text = tmp_path / "text.png"
    text.write_text("not an image")

    with pytest.raises(DreamBoothError) as info:
        load_images([good, corrupt, small, text], min_size=32)

    message = str(info.value)
    lines = message.splitlines()
    assert lines[0].startswith("3 of 4 images cannot be used")
    assert len(lines) == 4
    for bad, line in zip([corrupt, small, text], lines[1:]):
        assert str(bad) in line
    assert str(good) not in message


def test_load_images_returns_good_files_decoded_in_order(tmp_path):
    colours = [RED, GREEN, BLUE]
    paths = [save(tmp_path / f"{i}.png", Image.new("RGB", (40, 40), c)) for i, c in enumerate(colours)]
    images = load_images(paths, min_size=40)
    assert [(im.mode, im.size, im.getpixel((0, 0))) for im in images] == [("RGB", (40, 40), c) for c in colours]


# to_tensor


def test_to_tensor_shape_dtype_range():
    image = Image.fromarray(np.array([[[0, 255, 0]] * 4] * 4, dtype=np.uint8))
    tensor = to_tensor(image, size=4).pixels
    assert tensor.shape == (3, 4, 4) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))

    big = to_tensor(noise((80, 50)), size=32).pixels
    assert big.shape == (3, 32, 32)
    assert big.min() >= -1.0 and big.max() <= 1.0


def test_to_tensor_without_resize_keeps_pixels():
    image = noise((16, 16))
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(to_tensor(image, size=16).pixels, expected)


def test_center_crop_picks_the_middle():
    image = bands([RED, GREEN, BLUE])  # 48x16: already the right height, so no resize
    tensor = to_tensor(image, size=16, center_crop=True).pixels
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(tensor, expected)


def test_center_crop_of_a_tall_image_after_resize():
    tall = Image.new("RGB", (32, 96))
    for i, color in enumerate([RED, GREEN, BLUE]):
        tall.paste(color, (0, i * 32, 32, (i + 1) * 32))
    tensor = to_tensor(tall, size=16).pixels  # resized to 16x48, middle third is green
    assert tensor.shape == (3, 16, 16)
    inner = tensor[:, 2:-2, :]  # away from the bicubic blur at the band edges
    assert torch.allclose(inner[1], torch.ones_like(inner[1]), atol=0.02)
    assert torch.allclose(inner[0], -torch.ones_like(inner[0]), atol=0.02)


def gradient(width=64, height=16) -> Image.Image:
    """Every column has its own value in the red channel, so a crop reveals its offset."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :] * 4
    return Image.fromarray(pixels)


def crop_offset(tensor: torch.Tensor) -> int:
    return round(((tensor[0, 0, 0].item() + 1) * 127.5) / 4)


def random_crop(image: Image.Image, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return to_tensor(image, 16, center_crop=False, generator=generator).pixels


def test_random_crop_is_deterministic_and_matches_the_image():
    image = gradient()
    first = random_crop(image, seed=0)
    torch.testing.assert_close(first, random_crop(image, seed=0))

    left = crop_offset(first)
    expected = to_tensor(image.crop((left, 0, left + 16, 16)), 16).pixels
    torch.testing.assert_close(first, expected)


def test_random_crop_differs_across_seeds():
    image = gradient()
    offsets = {crop_offset(random_crop(image, seed)) for seed in range(6)}
    assert len(offsets) > 1
    assert all(0 <= o <= 48 for o in offsets)


def test_random_crop_draws_from_the_given_generator():
    generator = torch.Generator().manual_seed(123)
    expected_top = torch.randint(0, 1, (1,), generator=generator).item()
    expected_left = torch.randint(0, 49, (1,), generator=generator).item()
    assert expected_top == 0  # a 64x16 image can only move sideways
    assert crop_offset(random_crop(gradient(), seed=123)) == expected_left


def test_flip_mirrors():
    image = bands([RED, BLUE], band=8, height=16)  # 16x16
    plain = to_tensor(image, 16).pixels
    flipped = to_tensor(image, 16, flip=True).pixels
    torch.testing.assert_close(flipped, plain.flip(-1))
    torch.testing.assert_close(flipped[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue now left
    torch.testing.assert_close(flipped[:, 0, 15], torch.tensor([1.0, -1.0, -1.0]))


def test_to_tensor_rejects_non_rgb():
    with pytest.raises(ValueError, match="load_image"):
        to_tensor(Image.new("L", (8, 8)), 8)
