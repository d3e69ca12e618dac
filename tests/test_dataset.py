"""preprocessing.dataset: reading shards, validation on open, model input, resumable sampling and loading."""

import errno
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing import store
from preprocessing.dataset import LatentDataset, ResumableSampler, make_loader, sample_model_input

SHARD_SIZES = [4, 0, 5, 3]  # an empty shard (all images unreadable) in the middle
NUM_CLASSES = 3
MOMENTS_SHAPE = (8, 4, 4)  # mean and std of 4-channel 4x4 latents
SCALE, SHIFT = 0.5, 0.25  # not the SD values, so that a forgotten shift or scale shows


def write_dataset(root: Path, samples: np.ndarray, labels: np.ndarray, kind: str = "vae") -> Path:
    """A dataset in the on-disk format, written through the same functions the preprocessing uses."""
    root.mkdir(parents=True)
    ends = np.cumsum(SHARD_SIZES)
    for shard, (start, end) in enumerate(zip(ends - SHARD_SIZES, ends, strict=True)):
        images = [f"image_{i}.png" for i in range(start, end)]
        store.write_shard(root, shard, samples[start:end], labels[start:end].tolist(), images, [])
    channels = samples.shape[1] // 2 if kind == "vae" else samples.shape[1]
    description = {
        "kind": kind,
        "sample_shape": [channels, *samples.shape[2:]],
        "stored_shape": list(samples.shape[1:]),
        "stored_dtype": samples.dtype.name,
        "scale": SCALE if kind == "vae" else None,
        "shift": SHIFT if kind == "vae" else None,
        "num_classes": NUM_CLASSES,
        "class_names": [f"class_{k}" for k in range(NUM_CLASSES)],
    }
    store.finalize(root, len(SHARD_SIZES), description)
    return root


def random_moments(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((sum(SHARD_SIZES), *MOMENTS_SHAPE)).astype(np.float16)


@pytest.fixture
def moments_dataset(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    samples, labels = random_moments(rng), rng.integers(0, NUM_CLASSES, sum(SHARD_SIZES))
    return write_dataset(tmp_path / "data", samples, labels), samples, labels


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
    pixels = np.random.default_rng(1).integers(0, 256, (sum(SHARD_SIZES), 3, 4, 4), dtype=np.uint8)
    pixels[0, 0, 0, :2] = [0, 255]
    dataset = LatentDataset(write_dataset(tmp_path / "data", pixels, np.zeros(len(pixels), int), "pixels"))
    x, _ = dataset[0]
    assert x.dtype == torch.float32 and x[0, 0, 0].tolist() == -1.0 and x[0, 0, 1].tolist() == 1.0
    torch.testing.assert_close(dataset.get_batch(range(12))[0], torch.from_numpy(pixels) / 127.5 - 1)


# --- validation on open ---


def test_opening_a_folder_without_index_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json.*did not finish"):
        LatentDataset(tmp_path)


def test_shape_and_class_mismatches_name_both_values(moments_dataset):
    root = moments_dataset[0]
    with pytest.raises(
        ValueError, match=r"expects inputs of shape \(4, 32, 32\).*vae samples of shape \(4, 4, 4\)"
    ):
        LatentDataset(root, expected_shape=(4, 32, 32))
    with pytest.raises(ValueError, match="num_classes=1000, but .* has 3 classes"):
        LatentDataset(root, num_classes=1000)


def test_labels_out_of_range_are_refused(moments_dataset):
    root = moments_dataset[0]
    np.save(root / store.LABELS_FILE, np.full(12, NUM_CLASSES))
    with pytest.raises(ValueError, match=r"labels span \[3, 3\], outside the 3 classes \[0, 2\]"):
        LatentDataset(root)


def test_a_shard_that_disagrees_with_the_index_is_refused(moments_dataset):
    root = moments_dataset[0]
    np.save(root / store.shard_data_file(2), np.zeros((5, 8, 2, 2), np.float16))
    with pytest.raises(
        ValueError,
        match=r"shard-00002.npy holds float16 \(5, 8, 2, 2\), the index says float16 "
        r"\(5, 8, 4, 4\)",
    ):
        LatentDataset(root)


def test_a_missing_shard_is_refused(moments_dataset):
    root = moments_dataset[0]
    (root / store.shard_data_file(1)).unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.npy, listed in index.json, is missing"):
        LatentDataset(root)


def test_running_out_of_file_descriptors_says_what_to_do(moments_dataset, monkeypatch):
    dataset = LatentDataset(moments_dataset[0])

    def no_more_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(np, "load", no_more_files)
    with pytest.raises(
        OSError, match="raise `ulimit -n`, or preprocess again with a larger --images-per-shard"
    ):
        dataset[0]


def test_verify_finds_a_changed_byte(moments_dataset):
    root = moments_dataset[0]
    LatentDataset(root).verify()
    data = bytearray((root / store.shard_data_file(3)).read_bytes())
    data[-1] ^= 1
    (root / store.shard_data_file(3)).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00003.npy has sha256 .* the index says"):
        LatentDataset(root).verify()


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


def test_loader_takes_any_map_dataset():
    data = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10) % 3)
    x, y = next(make_loader(data, 4, shuffle=False, num_workers=0))
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0] and y.tolist() == [0, 1, 2, 0]
