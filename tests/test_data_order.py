"""The data order is a pure function of (seed, position); batches put subject examples first; captions."""

from pathlib import Path

import pytest
import torch

from conftest import write_photos
from dreambooth.config import ConceptConfig, DataConfig
from dreambooth.data.dataset import DataOrder, DreamBoothData, class_examples, subject_examples
from dreambooth.data.images import to_tensor
from dreambooth.errors import DreamBoothError


def epoch_pairs(order: DataOrder, epoch: int) -> list[tuple[int, int | None]]:
    return [order.pair(p) for p in range(epoch * order.epoch_len, (epoch + 1) * order.epoch_len)]


# ---- DataOrder ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_subject, n_class", [(7, 3), (3, 7), (5, 5)])
def test_every_epoch_is_a_permutation_with_modulo_pairing(n_subject, n_class):
    order = DataOrder(n_subject, n_class, seed=0)
    n = max(n_subject, n_class)
    assert order.epoch_len == n
    for epoch in range(4):
        pairs = epoch_pairs(order, epoch)
        # the larger side visits each of its examples exactly once: the epoch is a permutation of range(n)
        index = [s if n_subject >= n_class else c for s, c in pairs]
        assert sorted(index) == list(range(n))
        # index i pairs subject i % Ns with class i % Nc
        assert pairs == [(i % n_subject, i % n_class) for i in index]


def test_no_class_images_pairs_with_none():
    order = DataOrder(4, 0, seed=0)
    pairs = epoch_pairs(order, 0) + epoch_pairs(order, 1)
    assert all(c is None for _, c in pairs)
    assert sorted(s for s, _ in pairs[:4]) == [0, 1, 2, 3]


def test_order_is_deterministic_per_seed():
    a = [DataOrder(6, 4, seed=3).pair(p) for p in range(30)]
    b = [DataOrder(6, 4, seed=3).pair(p) for p in range(30)]
    c = [DataOrder(6, 4, seed=4).pair(p) for p in range(30)]
    assert a == b
    assert a != c


def test_epochs_use_different_permutations():
    order = DataOrder(8, 2, seed=0)
    perms = [tuple(s for s, _ in epoch_pairs(order, e)) for e in range(5)]
    assert len(set(perms)) == 5  # 8! orders: five equal-by-chance epochs would be a bug
    assert perms[0] != tuple(range(8))  # and shuffled, not identity


def test_pair_does_not_depend_on_query_order():
    in_order = DataOrder(5, 3, seed=1)
    expected = [in_order.pair(p) for p in range(21)]
    jumping = DataOrder(5, 3, seed=1)
    first = jumping.pair(17)  # epoch 3 before epochs 0..2
    assert first == expected[17]
    assert [jumping.pair(p) for p in range(21)] == expected
    assert [jumping.pair(p) for p in reversed(range(21))] == expected[::-1]  # backwards across epochs too


def test_augmentation_generator_is_a_function_of_seed_and_position():
    a, b = DataOrder(3, 0, seed=2), DataOrder(3, 0, seed=2)
    draws = [torch.rand(4, generator=a.augmentation_generator(p)) for p in range(5)]
    assert all(torch.equal(d, torch.rand(4, generator=b.augmentation_generator(p))) for p, d in enumerate(draws))
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], torch.rand(4, generator=DataOrder(3, 0, seed=3).augmentation_generator(0)))


# ---- batches ------------------------------------------------------------------------------

DATA = DataConfig(resolution=32, min_size=16)


@pytest.fixture
def concept(tmp_path, photos):
    return ConceptConfig(instance_dir=str(photos), instance_prompt="a photo of sks dog", class_prompt="a photo of a dog")


@pytest.fixture
def class_files(tmp_path):
    return write_photos(tmp_path / "class", 3, seed=1)


def make_data(concept, class_files, data=DATA, seed=0, with_class=True):
    subject = subject_examples([concept], data)
    klass = class_examples([class_files], [concept], data) if with_class else []
    return DreamBoothData(subject, klass, data, seed)


def test_batch_with_prior_puts_subject_first(concept, class_files):
    data = make_data(concept, class_files)
    assert len(data.subject) == 5 and len(data.klass) == 3
    batch = data.batch(first_position=6, batch_size=2, with_pixels=True)
    pairs = [data.order.pair(6), data.order.pair(7)]
    assert batch.indices == [("subject", pairs[0][0]), ("subject", pairs[1][0]),
                             ("class", pairs[0][1]), ("class", pairs[1][1])]
    assert batch.is_prior.tolist() == [False, False, True, True]
    assert batch.is_prior.dtype == torch.bool
    assert [e.prompt for e in batch.examples] == ["a photo of sks dog"] * 2 + ["a photo of a dog"] * 2
    assert [e.path for e in batch.examples] == [data.subject[pairs[0][0]].path, data.subject[pairs[1][0]].path,
                                                data.klass[pairs[0][1]].path, data.klass[pairs[1][1]].path]
    assert batch.pixels.shape == (4, 3, 32, 32) and batch.pixels.dtype == torch.float32
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    # no augmentation: each tensor is its image's centre crop
    for (kind, i), pixels in zip(batch.indices, batch.pixels):
        image = (data.subject if kind == "subject" else data.klass)[i].image
        torch.testing.assert_close(pixels, to_tensor(image, 32).pixels, rtol=0, atol=0)


def test_batch_without_prior(concept, class_files):
    data = make_data(concept, class_files, with_class=False)
    batch = data.batch(0, 3, with_pixels=False)
    assert batch.pixels is None
    assert batch.is_prior.tolist() == [False, False, False]
    assert [k for k, _ in batch.indices] == ["subject"] * 3
    assert sorted(i for _, i in data.batch(0, 5, with_pixels=False).indices) == [0, 1, 2, 3, 4]


def test_no_subject_images_is_an_error():
    with pytest.raises(DreamBoothError, match="no subject images"):
        DreamBoothData([], [], DATA, 0)


def test_random_flip_is_deterministic_per_position(concept, class_files):
    flip_data = DataConfig(resolution=32, min_size=16, random_flip=True)
    a = make_data(concept, class_files, data=flip_data)
    b = make_data(concept, class_files, data=flip_data)
    flipped = []
    for p in range(16):
        batch = a.batch(p, 1, with_pixels=True)
        torch.testing.assert_close(batch.pixels, b.batch(p, 1, with_pixels=True).pixels, rtol=0, atol=0)
        torch.testing.assert_close(batch.pixels, a.batch(p, 1, with_pixels=True).pixels, rtol=0, atol=0)  # asked again
        (_, s), (_, c) = batch.indices
        for (kind, i), pixels in zip(batch.indices, batch.pixels):
            image = (a.subject if kind == "subject" else a.klass)[i].image
            plain, mirrored = to_tensor(image, 32).pixels, to_tensor(image, 32, flip=True).pixels
            assert not torch.equal(plain, mirrored)
            assert torch.equal(pixels, plain) or torch.equal(pixels, mirrored)
            flipped.append(torch.equal(pixels, mirrored))
    assert 0 < sum(flipped) < len(flipped)  # some flipped, some not


# ---- captions -------------------------------------------------------------------------

def test_caption_file_replaces_the_prompt_for_that_image_only(concept):
    Path(concept.instance_dir, "photo_01.txt").write_text("\ufeffa photo of sks dog on a beach\n", encoding="utf-8")
    examples = subject_examples([concept], DATA)
    assert [e.path.name for e in examples] == [f"photo_{i:02d}.png" for i in range(5)]
    assert [e.prompt for e in examples] == ["a photo of sks dog", "a photo of sks dog on a beach"] + ["a photo of sks dog"] * 3
    assert all(e.image.mode == "RGB" and e.image.size == (40, 40) for e in examples)


def test_other_caption_extension(concept):
    Path(concept.instance_dir, "photo_02.caption").write_text("sks dog asleep")
    Path(concept.instance_dir, "photo_03.txt").write_text("ignored: not the configured extension")
    examples = subject_examples([concept], DataConfig(resolution=32, min_size=16, caption_extension=".caption"))
    assert [e.prompt for e in examples] == ["a photo of sks dog"] * 2 + ["sks dog asleep"] + ["a photo of sks dog"] * 2


def test_empty_caption_file_is_an_error(concept):
    Path(concept.instance_dir, "photo_00.txt").write_text("  \n")
    with pytest.raises(DreamBoothError, match="photo_00.txt"):
        subject_examples([concept], DATA)


def test_class_examples_carry_the_class_prompt(concept, class_files):
    examples = class_examples([class_files], [concept], DATA)
    assert [e.path for e in examples] == class_files
    assert {e.prompt for e in examples} == {"a photo of a dog"}
