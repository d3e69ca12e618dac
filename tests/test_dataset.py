"""preprocessing.dataset: reading shards and clean images, validation on open, verification, model
input, resumable sampling and loading."""

import errno
import hashlib
import json
import logging
import os
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from errors import UserError
from preprocessing import store
from preprocessing.dataset import LatentDataset, ResumableSampler, make_loader, sample_model_input

SHARD_SIZES = [4, 0, 5, 3]  # an empty shard (all images unreadable) in the middle
NUM_CLASSES = 3
MOMENTS_SHAPE = (8, 4, 4)  # mean and std of 4-channel 4x4 latents
SCALE, SHIFT = 0.5, 0.25  # not the SD values, so that a forgotten shift or scale shows
IMAGE_SHAPE = (3, 8, 8)  # the clean images of 4x4 latents of a VAE that downsamples by 2


def write_dataset(
    root: Path, samples: np.ndarray, labels: np.ndarray, kind: str = "vae", images: np.ndarray | None = None
) -> Path:
    """A dataset in the on-disk format, written through the same functions the preprocessing uses;
    with `images`, VAE data with the clean images of --keep-images. Without, the index has none of the
    image keys, as every dataset written before they existed."""
    root.mkdir(parents=True)
    ends = np.cumsum(SHARD_SIZES)
    for shard, (start, end) in enumerate(zip(ends - SHARD_SIZES, ends, strict=True)):
        paths = [f"image_{i}.png" for i in range(start, end)]
        clean_images = None if images is None else images[start:end]
        store.write_shard(root, shard, samples[start:end], labels[start:end].tolist(), paths, [], clean_images)
    channels = samples.shape[1] // 2 if kind == "vae" else samples.shape[1]
    image_keys = {"has_images": True, "image_shape": list(IMAGE_SHAPE), "image_dtype": "uint8"}
    description = {
        "kind": kind,
        "sample_shape": [channels, *samples.shape[2:]],
        "stored_shape": list(samples.shape[1:]),
        "stored_dtype": samples.dtype.name,
        "scale": SCALE if kind == "vae" else None,
        "shift": SHIFT if kind == "vae" else None,
        "num_classes": NUM_CLASSES,
        "class_names": [f"class_{k}" for k in range(NUM_CLASSES)],
        **({} if images is None else image_keys),
    }
    store.finalize(root, len(SHARD_SIZES), description)
    return root


def random_moments(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((sum(SHARD_SIZES), *MOMENTS_SHAPE)).astype(np.float16)


def random_pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, (sum(SHARD_SIZES), *shape), dtype=np.uint8)


@pytest.fixture
def moments_dataset(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    samples, labels = random_moments(rng), rng.integers(0, NUM_CLASSES, sum(SHARD_SIZES))
    return write_dataset(tmp_path / "data", samples, labels), samples, labels


@pytest.fixture
def images_dataset(tmp_path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """VAE data with clean images (--keep-images)."""
    rng = np.random.default_rng(1)
    samples, labels = random_moments(rng), rng.integers(0, NUM_CLASSES, sum(SHARD_SIZES))
    images = random_pixels(rng, IMAGE_SHAPE)
    return write_dataset(tmp_path / "with_images", samples, labels, images=images), samples, labels, images


# --- reading ---


def test_items_and_batches_are_the_stored_samples(moments_dataset):
    root, samples, labels = moments_dataset
    dataset = LatentDataset(root, expected_shape=(4, 4, 4), num_classes=NUM_CLASSES)
    assert len(dataset) == len(samples) == 12
    for i in range(len(dataset)):
        moments, label = dataset[i]
        assert moments.dtype == torch.float16 and label == labels[i]
        np.testing.assert_array_equal(moments.numpy(), samples[i])
    indices = [11, 0, 4, 4, 8, 3, 9]  # any order, repeats, across shards
    batch, batch_labels = dataset.get_batch(indices)
    np.testing.assert_array_equal(batch.numpy(), samples[indices])
    np.testing.assert_array_equal(batch_labels.numpy(), labels[indices])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_pixels_come_back_in_the_unit_range(tmp_path):
    pixels = random_pixels(np.random.default_rng(1), (3, 4, 4))
    pixels[0, 0, 0, :2] = [0, 255]
    dataset = LatentDataset(write_dataset(tmp_path / "data", pixels, np.zeros(len(pixels), int), "pixels"))
    x, _ = dataset[0]
    assert x.dtype == torch.float32 and x[0, 0, 0].tolist() == -1.0 and x[0, 0, 1].tolist() == 1.0
    torch.testing.assert_close(dataset.get_batch(range(12))[0], torch.from_numpy(pixels) / 127.5 - 1)


def test_clean_images_come_with_their_samples(images_dataset):
    root, samples, labels, images = images_dataset
    dataset = LatentDataset(root, expected_shape=(4, 4, 4), with_images=True)
    assert dataset.has_images and dataset.meta["shards"][0]["images_file"] == "images-00000.npy"
    for i in range(len(dataset)):
        moments, label, image = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == IMAGE_SHAPE and label == labels[i]
        np.testing.assert_array_equal(image.numpy(), images[i])
        np.testing.assert_array_equal(moments.numpy(), samples[i])
    indices = [11, 0, 4, 4, 8, 3, 9]
    batch, batch_labels, batch_images = dataset.get_batch(indices)
    assert batch_images.dtype == torch.uint8 and batch_images.shape == (7, *IMAGE_SHAPE)
    np.testing.assert_array_equal(batch_images.numpy(), images[indices])
    np.testing.assert_array_equal(batch.numpy(), samples[indices])
    np.testing.assert_array_equal(batch_labels.numpy(), labels[indices])
    assert len(LatentDataset(root)[0]) == len(LatentDataset(root).get_batch([0])) == 2  # asked for none


def test_pixel_data_returns_its_samples_as_the_clean_images(tmp_path):
    pixels = random_pixels(np.random.default_rng(2), (3, 4, 4))
    root = write_dataset(tmp_path / "data", pixels, np.zeros(len(pixels), int), "pixels")
    dataset = LatentDataset(root, with_images=True)  # an index without has_images: pixel data has them
    assert dataset.has_images and not list(root.glob("images-*"))
    x, _, image = dataset[5]
    assert image.dtype == torch.uint8
    np.testing.assert_array_equal(image.numpy(), pixels[5])
    torch.testing.assert_close(x, image / 127.5 - 1, rtol=0, atol=0)
    x, _, images = dataset.get_batch([7, 2])
    np.testing.assert_array_equal(images.numpy(), pixels[[7, 2]])
    torch.testing.assert_close(x, images / 127.5 - 1, rtol=0, atol=0)


def test_asking_for_images_a_dataset_lacks_says_how_to_make_them(moments_dataset):
    root = moments_dataset[0]
    assert not LatentDataset(root).has_images
    with pytest.raises(UserError, match="no clean images.*rerun `python -m preprocessing` .*--keep-images into a new"):
        LatentDataset(root, with_images=True)


def test_the_checksum_covers_the_image_files_and_is_unchanged_without_them(images_dataset, moments_dataset):
    meta = LatentDataset(moments_dataset[0]).meta
    sums = [shard["sha256"] for shard in meta["shards"]] + [meta["labels_sha256"]]
    assert meta["checksum"] == hashlib.sha256("\n".join(sums).encode()).hexdigest()  # format version 1's rule
    meta = LatentDataset(images_dataset[0]).meta
    sums = [shard["sha256"] for shard in meta["shards"]] + [meta["labels_sha256"]]
    sums += [shard["images_sha256"] for shard in meta["shards"]]
    assert meta["checksum"] == hashlib.sha256("\n".join(sums).encode()).hexdigest()


# --- validation on open ---


def test_opening_a_folder_without_index_names_the_problem(tmp_path):
    with pytest.raises(UserError, match="no index.json.*did not finish"):
        LatentDataset(tmp_path)


def test_shape_and_class_mismatches_name_both_values(moments_dataset):
    root = moments_dataset[0]
    with pytest.raises(UserError, match=r"expects inputs of shape \(4, 32, 32\).*vae samples of shape \(4, 4, 4\)"):
        LatentDataset(root, expected_shape=(4, 32, 32))
    with pytest.raises(UserError, match="num_classes=1000, but .* has 3 classes"):
        LatentDataset(root, num_classes=1000)


def test_labels_out_of_range_are_refused(moments_dataset):
    root = moments_dataset[0]
    np.save(root / store.LABELS_FILE, np.full(12, NUM_CLASSES))
    with pytest.raises(UserError, match=r"labels span \[3, 3\], outside the 3 classes \[0, 2\]"):
        LatentDataset(root)


@pytest.mark.parametrize("file", [store.shard_data_file(2), store.shard_images_file(2)])
def test_a_shard_that_disagrees_with_the_index_is_refused(images_dataset, file):
    root = images_dataset[0]
    wrong = np.zeros((5, 8, 2, 2), np.float16) if file.startswith("shard") else np.zeros((5, 3, 8, 8), np.int16)
    np.save(root / file, wrong)
    expected = r"float16 \(5, 8, 4, 4\)" if file.startswith("shard") else r"uint8 \(5, 3, 8, 8\)"
    with pytest.raises(UserError, match=rf"{file} holds {wrong.dtype} \(5, .*\), the index says {expected}"):
        LatentDataset(root, with_images=True)


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def edit_index(change):
    def damage(root: Path) -> None:
        index = json.loads((root / store.INDEX_FILE).read_text())
        change(index)
        (root / store.INDEX_FILE).write_text(json.dumps(index))

    return damage


DAMAGE = {  # (what is done to the dataset, the file the error names, what it says)
    "shard cut in its data": (lambda r: truncate(r / "shard-00002.npy", -10), "shard-00002.npy", "truncated"),
    "shard cut in its header": (lambda r: truncate(r / "shard-00002.npy", 30), "shard-00002.npy", "truncated"),
    "shard emptied": (lambda r: truncate(r / "shard-00000.npy", 0), "shard-00000.npy", "truncated"),
    "shard too long": (lambda r: open(r / "shard-00003.npy", "ab").write(b"x"), "shard-00003.npy", "corrupt"),
    "shard missing": (lambda r: (r / "shard-00001.npy").unlink(), "shard-00001.npy", "is missing"),
    "images cut": (lambda r: truncate(r / "images-00003.npy", -1), "images-00003.npy", "truncated"),
    "images missing": (lambda r: (r / "images-00000.npy").unlink(), "images-00000.npy", "is missing"),
    "labels cut": (lambda r: truncate(r / "labels.npy", -8), "labels.npy", "truncated"),
    "labels cut in its header": (lambda r: truncate(r / "labels.npy", 20), "labels.npy", "truncated"),
    "labels missing": (lambda r: (r / "labels.npy").unlink(), "labels.npy", "is missing"),
    "index cut": (lambda r: truncate(r / "index.json", 200), "index.json", "not valid JSON.*truncated"),
    "index not an object": (lambda r: (r / "index.json").write_text("[]"), "index.json", "JSON list, not an"),
    "index without shards": (edit_index(lambda i: i.pop("shards")), "index.json", "malformed: it lacks shards;"),
    "index without image shape": (edit_index(lambda i: i.pop("image_shape")), "index.json", "lacks image_shape;"),
    "shard entry without sha256": (
        edit_index(lambda i: i["shards"][1].pop("sha256")), "index.json", "lacks shards\\[\\]\\.sha256;"
    ),
    "index with a wrong count": (edit_index(lambda i: i.update(num_samples=13)), "index.json", "12 samples, its"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_or_missing_file_is_a_one_line_error_naming_it(images_dataset, case):
    root = images_dataset[0]
    damage, file, message = DAMAGE[case]
    damage(root)
    with pytest.raises(UserError, match=rf"{root / file}\b.*{message}") as error:
        LatentDataset(root, with_images=True)
    assert "\n" not in str(error.value)


def test_running_out_of_file_descriptors_says_what_to_do(moments_dataset, monkeypatch):
    dataset = LatentDataset(moments_dataset[0])

    def no_more_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(np, "load", no_more_files)
    with pytest.raises(
        OSError, match="raise `ulimit -n`, or preprocess again with a larger --images-per-shard"
    ):
        dataset[0]


def flip_a_byte(path: Path, position: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", [store.shard_data_file(3), store.shard_images_file(0), store.LABELS_FILE])
def test_verify_finds_a_changed_byte(images_dataset, file):
    root, labels = images_dataset[0], images_dataset[2]
    assert LatentDataset(root).verify() is True
    # In labels.npy, the lowest byte of a label 0: it becomes 1, still in range (the open would refuse 3).
    zero = int(np.flatnonzero(labels == 0)[-1])
    flip_a_byte(root / file, -8 * (len(labels) - zero) if file == store.LABELS_FILE else -1)
    with pytest.raises(UserError, match=rf"{root / file} has sha256 .* index.json says .*the dataset is corrupt"):
        LatentDataset(root).verify()


def test_verify_finds_a_file_gone_or_an_index_that_disagrees_with_itself(images_dataset):
    root = images_dataset[0]
    dataset = LatentDataset(root)
    (root / store.shard_images_file(1)).unlink()  # after the open: without images, it does not look at them
    with pytest.raises(UserError, match=rf"{root / store.shard_images_file(1)}, listed in index.json, is missing"):
        dataset.verify()
    dataset.meta["shards"][2]["images_sha256"] = "0" * 64
    with pytest.raises(UserError, match="checksum in .*index.json does not match its file list: the index is corrupt"):
        dataset.verify()


@pytest.fixture
def hashed_files(monkeypatch) -> list[str]:
    """The names of the files store.sha256_file reads, in order."""
    hashed, sha256_file = [], store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda path: (hashed.append(path.name), sha256_file(path))[1])
    return hashed


def test_a_verified_dataset_is_not_hashed_again_until_a_file_changes(images_dataset, hashed_files):
    root = images_dataset[0]
    dataset = LatentDataset(root, with_images=True)
    assert dataset.verify() is True and len(hashed_files) == 2 * len(SHARD_SIZES) + 1  # shards, labels, images
    stamp = json.loads((root / store.VERIFIED_FILE).read_text())
    assert stamp["checksum"] == dataset.meta["checksum"] and sorted(stamp["files"]) == sorted(hashed_files)
    hashed_files.clear()
    assert LatentDataset(root).verify() is False and hashed_files == []  # the stamp matched
    shard = root / store.shard_data_file(1)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))  # touched: a new mtime
    assert dataset.verify() is True and len(hashed_files) == 2 * len(SHARD_SIZES) + 1
    hashed_files.clear()
    assert dataset.verify() is False and hashed_files == []
    flip_a_byte(root / store.shard_images_file(2))
    with pytest.raises(UserError, match="images-00002.npy has sha256"):
        dataset.verify()


def test_verify_without_stamp_always_hashes_and_writes_none(moments_dataset, hashed_files):
    root = moments_dataset[0]
    assert LatentDataset(root).verify(stamp=False) is True and LatentDataset(root).verify(stamp=False) is True
    assert len(hashed_files) == 2 * (len(SHARD_SIZES) + 1) and not (root / store.VERIFIED_FILE).exists()


def test_a_folder_that_cannot_be_written_is_verified_all_the_same(moments_dataset, monkeypatch, caplog):
    root = moments_dataset[0]

    def read_only(path, content):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(store, "write_json", read_only)
    with caplog.at_level(logging.WARNING):
        assert LatentDataset(root).verify() is True and LatentDataset(root).verify() is True
    assert not (root / store.VERIFIED_FILE).exists()
    assert [record.message.count("\n") for record in caplog.records] == [0, 0]
    assert "cannot record it in .verified.json" in caplog.records[0].message


def test_a_damaged_stamp_means_hashing_again(moments_dataset, hashed_files):
    root = moments_dataset[0]
    LatentDataset(root).verify()
    truncate(root / store.VERIFIED_FILE, 10)
    hashed_files.clear()
    assert LatentDataset(root).verify() is True and len(hashed_files) == len(SHARD_SIZES) + 1


# --- model input ---


def test_model_input_is_a_fresh_scaled_latent():
    mean, std = torch.randn(5, 4, 4, 4), torch.rand(5, 4, 4, 4)
    moments = torch.cat([mean, std], dim=1).half()  # (5, 8, 4, 4), as the loader yields it
    meta = {"kind": "vae", "scale": SCALE, "shift": SHIFT}
    x0 = sample_model_input(moments, meta, torch.Generator().manual_seed(7))
    noise = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    mean, std = moments.float().chunk(2, dim=1)
    assert x0.dtype == torch.float32 and x0.shape == (5, 4, 4, 4)
    torch.testing.assert_close(x0, (mean + std * noise - SHIFT) * SCALE, rtol=0, atol=0)
    zero_std = torch.cat([mean, torch.zeros_like(std)], dim=1)
    torch.testing.assert_close(sample_model_input(zero_std, meta), (mean - SHIFT) * SCALE, rtol=0, atol=0)
    second = sample_model_input(moments, meta, torch.Generator().manual_seed(8))
    assert not torch.equal(x0, second)  # a new latent each call


def test_model_input_of_pixels_is_the_stored_values():
    pixels = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.equal(sample_model_input(pixels, {"kind": "pixels", "scale": None, "shift": None}), pixels)


# --- sampler ---


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_epoch_is_split_evenly_across_ranks(shuffle):
    num_samples, world_size = 23, 4  # 3 samples per epoch are dropped so that ranks stay in step
    for epoch in range(3):
        per_rank = [
            ResumableSampler(
                num_samples, rank=r, world_size=world_size, seed=5, shuffle=shuffle
            ).epoch_indices(epoch)
            for r in range(world_size)
        ]
        assert all(len(indices) == 5 for indices in per_rank)
        drawn = np.concatenate(per_rank)
        assert len(set(drawn.tolist())) == 20 and drawn.min() >= 0 and drawn.max() < num_samples
        if not shuffle:
            np.testing.assert_array_equal(per_rank[1], [1, 5, 9, 13, 17])
    first = ResumableSampler(num_samples, seed=5).epoch_indices(0)
    assert sorted(first.tolist()) == list(range(num_samples))
    assert not np.array_equal(first, ResumableSampler(num_samples, seed=5).epoch_indices(1))
    assert not np.array_equal(first, ResumableSampler(num_samples, seed=6).epoch_indices(0))
    np.testing.assert_array_equal(first, ResumableSampler(num_samples, seed=5).epoch_indices(0))


@pytest.mark.parametrize("consumed", [0, 3, 7, 10, 26])
def test_a_resumed_sampler_continues_the_stream(consumed):
    make = lambda consumed: ResumableSampler(
        15, rank=1, world_size=2, seed=3, consumed=consumed
    )  # 7 per rank
    uninterrupted = list(islice(iter(make(0)), consumed + 20))
    assert list(islice(iter(make(consumed)), 20)) == uninterrupted[consumed:]
    assert make(0).state(consumed) == {"epoch": consumed // 7, "position": consumed % 7}


def test_sampler_refuses_impossible_splits():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        ResumableSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="3 samples cannot be split across 4 ranks"):
        ResumableSampler(3, world_size=4)


# --- loader ---


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_loader_yields_the_batches_of_an_uninterrupted_run(moments_dataset, num_workers):
    root, samples, labels = moments_dataset
    dataset = LatentDataset(root)
    batch_size, resume_at = 4, 3  # 6 samples per rank and epoch: batches straddle epochs
    load = lambda consumed: make_loader(
        dataset, batch_size, rank=1, world_size=2, seed=9, consumed=consumed, num_workers=num_workers
    )
    uninterrupted = list(islice(load(0), resume_at + 4))
    resumed = list(islice(load(resume_at * batch_size), 4))
    for (x, y), (x_resumed, y_resumed) in zip(uninterrupted[resume_at:], resumed, strict=True):
        assert torch.equal(x, x_resumed) and torch.equal(y, y_resumed)
    indices = list(
        islice(iter(ResumableSampler(12, rank=1, world_size=2, seed=9)), len(uninterrupted) * batch_size)
    )
    for k, (x, y) in enumerate(uninterrupted):
        batch = indices[k * batch_size : (k + 1) * batch_size]
        assert x.shape == (batch_size, *MOMENTS_SHAPE)
        np.testing.assert_array_equal(x.numpy(), samples[batch])
        np.testing.assert_array_equal(y.numpy(), labels[batch])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loader_passes_clean_images_through(images_dataset, num_workers):
    root, samples, labels, images = images_dataset
    loader = make_loader(LatentDataset(root, with_images=True), 5, seed=4, num_workers=num_workers)
    indices = list(islice(iter(ResumableSampler(12, seed=4)), 15))
    for k, batch in enumerate(islice(loader, 3)):
        x, y, batch_images = batch
        drawn = indices[k * 5 : (k + 1) * 5]
        assert batch_images.dtype == torch.uint8 and batch_images.shape == (5, *IMAGE_SHAPE)
        np.testing.assert_array_equal(batch_images.numpy(), images[drawn])
        np.testing.assert_array_equal(x.numpy(), samples[drawn])
        np.testing.assert_array_equal(y.numpy(), labels[drawn])


def test_loader_takes_any_map_dataset():
    data = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10) % 3)
    x, y = next(make_loader(data, 4, shuffle=False, num_workers=0))
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0] and y.tolist() == [0, 1, 2, 0]
