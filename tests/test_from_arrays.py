"""mrml.data.from_arrays: a user's labelled arrays as a few-shot dataset (pixel scale, resize, channels, splits, errors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrml.data import FewShotDataset, conform, episode_rng, from_arrays
from mrml.data.base import ArrayClassImages, to_tensor
from mrml.errors import UsageError


def arrays(classes: int = 6, per_class: int = 4, shape=(12, 12), seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(classes * per_class, *shape), dtype=np.uint8)
    return images, np.repeat(np.arange(classes), per_class)


def class_images(ds: FewShotDataset, split: str, cls: int) -> torch.Tensor:
    part = ds.splits[split]
    return part.images(cls, np.arange(part.count(cls)))


def test_uint8_scaled_exactly_as_the_glyphs_pipeline():
    images, labels = arrays()
    ds = from_arrays(images, labels, splits="test")
    assert isinstance(ds, FewShotDataset) and ds.kind == "classification" and ds.input_shape == (1, 12, 12)
    assert [ds.splits[s].num_classes for s in ("train", "validation", "test")] == [0, 0, 6]
    glyph_like = ArrayClassImages(["3"], [images[labels == 3]], to_tensor)  # how glyphs serves its uint8 arrays
    got = class_images(ds, "test", 3)
    assert got.dtype == torch.float32 and torch.equal(got, glyph_like.images(0, np.arange(4)))
    assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_float_torch_and_numpy_inputs_agree():
    images, labels = arrays()
    as_float = images.astype(np.float64) / 255
    a = from_arrays(as_float, labels, splits="test")
    b = from_arrays(torch.from_numpy(as_float), torch.from_numpy(labels), splits="test")
    c = from_arrays(images, labels, splits="test")
    for cls in range(6):
        expect = torch.from_numpy(as_float[labels == cls]).float().unsqueeze(1)
        assert torch.equal(class_images(a, "test", cls), expect)
        assert torch.equal(class_images(b, "test", cls), expect)
        assert torch.allclose(class_images(c, "test", cls), expect, atol=1e-7)


def test_resize_is_antialiased_bilinear_and_keeps_constants():
    images, labels = arrays(shape=(32, 32))
    images[labels == 0] = 200  # a flat class stays flat
    ds = from_arrays(images, labels, splits="test", image_size=28)
    assert ds.input_shape == (1, 28, 28)
    flat = class_images(ds, "test", 0)
    assert flat.shape == (4, 1, 28, 28) and torch.allclose(flat, torch.full_like(flat, 200 / 255), atol=1e-6)
    x = torch.from_numpy(images[labels == 1]).float().unsqueeze(1) / 255
    expect = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(class_images(ds, "test", 1), expect)


def test_channels_converted_both_ways():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(8, 3, 10, 10), dtype=np.uint8)
    labels = ["cat"] * 4 + ["dog"] * 4
    grey = from_arrays(rgb, labels, splits="test", channels=1)
    assert grey.input_shape == (1, 10, 10) and grey.splits["test"].names == ["cat", "dog"]
    expect = torch.from_numpy(rgb[:4].astype(np.float64) / 255).mean(dim=1, keepdim=True)
    assert torch.allclose(class_images(grey, "test", 0).double(), expect, atol=1e-6)
    mono = rng.integers(0, 256, size=(8, 10, 10), dtype=np.uint8)
    colour = from_arrays(mono, labels, splits="test", channels=3, image_size=6)
    x = class_images(colour, "test", 1)
    assert colour.input_shape == (3, 6, 6) and x.shape == (4, 3, 6, 6)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_split_by_dict_names_and_episodes_are_seeded():
    images, labels = arrays(classes=6, per_class=5)
    ds = from_arrays(images, labels, splits={"train": [5, 0, 1], "validation": [2], "test": [3, 4]}, name="mine")
    assert ds.name == "mine" and ds.splits["train"].names == ["5", "0", "1"] and ds.splits["test"].names == ["3", "4"]
    a = ds.episode("train", 3, 2, 3, episode_rng(4, "train", 7))
    b = ds.episode("train", 3, 2, 3, episode_rng(4, "train", 7))
    assert a.support_x.shape == (6, 1, 12, 12) and a.query_x.shape == (9, 1, 12, 12)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert a.support_y.tolist() == [0, 0, 1, 1, 2, 2]
    # every support image is one of the class's images (no mixing across classes)
    for k in range(3):
        pool = torch.cat([class_images(ds, "train", c) for c in range(3)])
        assert any(torch.equal(a.support_x[2 * k], img) for img in pool)


def test_fraction_split_is_a_seeded_partition_of_the_classes():
    images, labels = arrays(classes=10, per_class=2)
    ds = from_arrays(images, labels, splits=(0.6, 0.2, 0.2), seed=3)
    names = {s: ds.splits[s].names for s in ("train", "validation", "test")}
    assert [len(v) for v in names.values()] == [6, 2, 2]
    assert sorted(sum(names.values(), []), key=int) == [str(i) for i in range(10)]
    assert names == {s: from_arrays(images, labels, splits=(0.6, 0.2, 0.2), seed=3).splits[s].names for s in names}
    others = [{s: from_arrays(images, labels, splits=[0.6, 0.2, 0.2], seed=k).splits[s].names for s in names}
              for k in range(4, 8)]
    assert any(o != names for o in others)  # the seed deals the classes
    test_only = from_arrays(images, labels, splits=(0, 0, 1))
    assert test_only.splits["test"].num_classes == 10 and test_only.splits["train"].num_classes == 0


def test_missing_split_says_it_was_not_given():
    images, labels = arrays()
    ds = from_arrays(images, labels, splits="test")
    with pytest.raises(UsageError, match="the train split of arrays has no classes"):
        ds.check_episode("train", 2, 1, 1)
    ds.check_episode("test", 6, 1, 3)
    with pytest.raises(UsageError, match="lower --shots"):
        ds.check_episode("test", 2, 2, 3)


IMAGES, LABELS = arrays()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(labels=LABELS[:-1]), "one label per image (got 24 images, 23 labels)"),
    (dict(images=IMAGES[0]), "one label per image"),
    (dict(images=IMAGES[:, 0, 0]), "shaped (n, d) feature vectors, or (n, H, W) or (n, C, H, W) images (got 1 dim"),
    (dict(images=IMAGES.reshape(24, 1, 1, 12, 12)), "(got 5 dimensions"),
    (dict(images=np.zeros((24, 12, 12, 3), np.uint8)), "pass images.transpose(0, 3, 1, 2)"),
    (dict(images=np.zeros((24, 4, 12, 12), np.uint8)), "C = 1 or 3 channels"),
    (dict(images=np.where(IMAGES > 9, IMAGES / 255, np.nan)), "NaN or infinite"),
    (dict(images=np.where(IMAGES > 9, IMAGES / 255 - 0.5, np.inf)), "NaN or infinite"),
    (dict(images=IMAGES.astype(np.int64)), "uint8 (0..255, divided by 255) or float (used as given), got int64"),
    (dict(images=IMAGES.reshape(24, 144), image_size=8), "image_size and channels apply to images"),
    (dict(images=IMAGES.reshape(24, 144) / 255, channels=1), "feature vectors (n, d) are used as given, drop them"),
    (dict(images=np.zeros((24, 0), np.float32)), "feature vectors must have at least 1 feature"),
    (dict(labels=LABELS.astype(float)), "labels must be ints or strings (got float64 labels)"),
    (dict(labels=LABELS.reshape(12, 2)), "labels must be one-dimensional"),
    (dict(labels=[1] * 12 + ["a"] * 12), "labels mix ints and strings"),
    (dict(labels=[None] * 24), "labels must be ints or strings"),
    (dict(splits={"train": [0, 1], "test": [2, 9]}), "splits['test'] names label 9, which no image has"),
    (dict(splits={"train": [0, 1], "test": [1, 2]}), "label 1 is in both 'train' and 'test': splits must be disjoint"),
    (dict(splits={"train": [0, 0]}), "label 0 is twice"),
    (dict(splits={"training": [0]}), "unknown split 'training'"),
    (dict(splits={"train": []}), "splits['train'] is empty"),
    (dict(splits="testing"), "unknown split 'testing'"),
    (dict(splits=(0.5, 0.5)), "three numbers"),
    (dict(splits=(0.5, 0.4, 0.2)), "sum to 1"),
    (dict(splits=(0.9, 0.05, 0.05)), "leave the validation split empty"),
    (dict(splits=3), "splits must be a split name"),
    (dict(labels=np.r_[LABELS[:-1], 99]), "class 99 has 1 image: every class needs at least 2"),
    (dict(image_size=0), "image_size must be an integer in 1..1024"),
    (dict(channels=2), "channels must be 1 or 3"),
    (dict(splits=(0.6, 0.2, 0.2), seed=-1), "seed must be an integer >= 0"),
])
def test_misuse_is_one_line(kwargs, needle):
    args = {"images": IMAGES, "labels": LABELS, "splits": "test", **kwargs}
    with pytest.raises(UsageError) as info:
        from_arrays(**args)
    message = str(info.value)
    assert needle in message and "\n" not in message, message


def test_conform_fits_size_and_channels_or_says_it_cannot():
    from mrml.data import conform

    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 3, 9, 9), dtype=np.uint8)
    ds = from_arrays(rgb, [0, 0, 1, 1, 2, 2], splits="test")
    assert conform(ds, (3, 9, 9)) is ds
    grey = conform(ds, (1, 5, 5))
    x = class_images(grey, "test", 2)
    direct = from_arrays(rgb, [0, 0, 1, 1, 2, 2], splits="test", image_size=5)
    expect = class_images(direct, "test", 2).mean(dim=1, keepdim=True)  # resized, then RGB averaged
    assert grey.input_shape == (1, 5, 5) and x.shape == (2, 1, 5, 5) and torch.allclose(x, expect, atol=1e-6)
    with pytest.raises(UsageError, match=r"shaped \(3, 9, 9\), the model takes \(2, 9, 9\)"):
        conform(ds, (2, 9, 9))


def test_from_arrays_feature_vectors():
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((30, 7))  # float64 embeddings with negative values: kept as given
    labels = np.repeat(np.arange(6), 5)
    ds = from_arrays(emb, labels, splits={"train": [0, 1, 2], "test": [3, 4, 5]})
    assert ds.input_shape == (7,) and ds.info["vectors"] and ds.info["scaling"] == "as given"
    for cls, key in enumerate([3, 4, 5]):
        assert torch.equal(class_images(ds, "test", cls), torch.from_numpy(emb[labels == key]).float())
    ep = ds.episode("train", 3, 2, 3, episode_rng(0, "train", 0))
    assert ep.support_x.shape == (6, 7) and ep.query_x.shape == (9, 7) and ep.support_x.dtype == torch.float32
    rows = {tuple(r) for r in torch.from_numpy(emb).float().tolist()}
    assert all(tuple(r) in rows for r in torch.cat([ep.support_x, ep.query_x]).tolist())  # not rescaled
    as_uint8 = rng.integers(0, 256, size=(30, 7), dtype=np.uint8)  # the one rule: uint8 -> / 255
    u = from_arrays(as_uint8, labels, splits="test")
    assert torch.equal(class_images(u, "test", 0), torch.from_numpy(as_uint8[:5]).float() / 255)
    with pytest.raises(UsageError, match=r"feature vectors of shape \(7,\), the model takes \(8,\)"):
        conform(ds, (8,))
    assert conform(ds, (7,)) is ds


def test_from_arrays_standardised_images_kept_as_given():
    rng = np.random.default_rng(4)
    pixels = rng.random((12, 3, 5, 5))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normed = ((pixels - mean[:, None, None]) / std[:, None, None]).astype(np.float32)  # ImageNet-normalised
    assert normed.min() < 0 and normed.max() > 1
    labels = np.repeat(np.arange(3), 4)
    ds = from_arrays(normed, labels, splits="test")
    assert ds.input_shape == (3, 5, 5) and ds.info["scaling"] == "as given"
    for cls in range(3):
        assert torch.equal(class_images(ds, "test", cls), torch.from_numpy(normed[labels == cls]))
    resized = from_arrays(normed, labels, splits="test", image_size=3)  # resized, still not rescaled
    x = torch.from_numpy(normed[labels == 1])
    expect = F.interpolate(x, size=(3, 3), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(class_images(resized, "test", 1), expect)


def test_from_arrays_float_whole_numbers_up_to_255_warn_and_are_kept():
    images, labels = arrays()
    with pytest.warns(UserWarning, match="used as given \\(not divided by 255\\): pass uint8"):
        ds = from_arrays(images.astype(np.float32), labels, splits="test")
    assert torch.equal(class_images(ds, "test", 2), torch.from_numpy(images[labels == 2]).float().unsqueeze(1))
