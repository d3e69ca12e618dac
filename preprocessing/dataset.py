"""The trainer's side of a preprocessed dataset: a memory-mapped Dataset, the model input, and an
infinite loader that resumes exactly where a run stopped."""

import errno
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from preprocessing import store
from preprocessing.image import pixels_to_unit_range


def _read_index(root: Path) -> dict:
    index_path = root / store.INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{root} has no {store.INDEX_FILE}: it is not a preprocessed dataset, or "
            "`python -m preprocessing` did not finish (rerun the same command to resume it)"
        )
    meta = store.read_json(index_path)
    if meta.get("format") != store.FORMAT_NAME or meta.get("format_version") != store.FORMAT_VERSION:
        raise ValueError(
            f"{index_path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this code reads {store.FORMAT_NAME!r} version {store.FORMAT_VERSION}"
        )
    return meta


class LatentDataset(Dataset):
    """(stored sample, label) pairs read from memory-mapped shards.

    A sample is the posterior moments (2C, H, W) float16 for VAE data (turn a batch into model input
    with `sample_model_input`), or the pixels (3, H, W) float32 in [-1, 1] for pixel data.
    """

    def __init__(
        self,
        root: str | Path,
        expected_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
    ):
        self.root = Path(root)
        self.meta = _read_index(self.root)
        self._check_model(expected_shape, num_classes)
        counts = [shard["num_samples"] for shard in self.meta["shards"]]
        self._shard_ends = np.cumsum(counts)  # sample i lives in the first shard whose end exceeds i
        self._shard_starts = self._shard_ends - counts
        self._shards: dict[int, np.ndarray] = {}  # memory maps, opened on first use in each process
        for shard in range(len(counts)):
            self._check_shard(shard)
        self.labels = np.load(self.root / self.meta["labels_file"])  # (N,) int64
        self._check_labels(num_classes)

    def _check_model(self, expected_shape, num_classes) -> None:
        sample_shape = tuple(self.meta["sample_shape"])
        if expected_shape is not None and tuple(expected_shape) != sample_shape:
            raise ValueError(
                f"the model expects inputs of shape {tuple(expected_shape)}, but {self.root} holds "
                f"{self.meta['kind']} samples of shape {sample_shape}"
            )
        if num_classes is not None and num_classes != self.meta["num_classes"]:
            raise ValueError(
                f"the model has num_classes={num_classes}, but {self.root} has "
                f"{self.meta['num_classes']} classes"
            )

    def _check_shard(self, shard: int) -> None:
        path = self.root / self.meta["shards"][shard]["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}, listed in {store.INDEX_FILE}, is missing")
        shape, dtype = store.read_npy_header(path)
        expected = (self.meta["shards"][shard]["num_samples"], *self.meta["stored_shape"])
        if shape != expected or dtype != np.dtype(self.meta["stored_dtype"]):
            raise ValueError(
                f"{path} holds {dtype} {shape}, the index says {self.meta['stored_dtype']} {expected}"
            )

    def _check_labels(self, num_classes: int | None) -> None:
        if self.labels.shape != (len(self),):
            raise ValueError(
                f"{self.meta['labels_file']} holds {self.labels.shape} labels, the index says "
                f"{len(self)} samples"
            )
        limit = self.meta["num_classes"] if num_classes is None else num_classes
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= limit):
            raise ValueError(
                f"labels span [{self.labels.min()}, {self.labels.max()}], outside the "
                f"{limit} classes [0, {limit - 1}]"
            )

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            path = self.root / self.meta["shards"][shard]["file"]
            # An empty shard (every image unreadable) cannot be memory-mapped; it is never indexed anyway.
            empty = self.meta["shards"][shard]["num_samples"] == 0
            try:
                self._shards[shard] = np.load(path, mmap_mode=None if empty else "r")
            except OSError as error:
                if error.errno != errno.EMFILE:
                    raise
                # Each memory map holds a file descriptor, and a reading process maps every shard.
                raise OSError(
                    error.errno,
                    f"{len(self._shards)} shards of {self.root} are open and the process may open no more "
                    "files: raise `ulimit -n`, or preprocess again with a larger --images-per-shard",
                ) from error
        return self._shards[shard]

    def __getstate__(self) -> dict:
        # Loader workers reopen the memory maps rather than receive copies of them.
        return {**self.__dict__, "_shards": {}}

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def _as_output(self, stored: np.ndarray) -> torch.Tensor:
        stored = torch.from_numpy(stored)
        return pixels_to_unit_range(stored) if self.meta["kind"] == "pixels" else stored

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        shard = int(np.searchsorted(self._shard_ends, i, side="right"))
        row = i - int(self._shard_starts[shard])
        return self._as_output(np.array(self._shard(shard)[row])), int(self.labels[i])

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples and labels for many indices at once: one fancy-indexed read per shard touched."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self._shard_ends, indices, side="right")
        rows = indices - self._shard_starts[shards]
        stored = np.empty((len(indices), *self.meta["stored_shape"]), dtype=self.meta["stored_dtype"])
        for shard in np.unique(shards):
            in_shard = shards == shard
            stored[in_shard] = self._shard(int(shard))[rows[in_shard]]
        return self._as_output(stored), torch.from_numpy(self.labels[indices])

    def verify(self) -> None:
        """Recompute every checksum (reads the whole dataset); raises ValueError on the first mismatch."""
        files = [(shard["file"], shard["sha256"]) for shard in self.meta["shards"]]
        for name, expected in [*files, (self.meta["labels_file"], self.meta["labels_sha256"])]:
            actual = store.sha256_file(self.root / name)
            if actual != expected:
                raise ValueError(f"{self.root / name} has sha256 {actual}, the index says {expected}")
        shard_sums = [expected for _, expected in files]
        if store.combined_checksum(shard_sums, self.meta["labels_sha256"]) != self.meta["checksum"]:
            raise ValueError(f"the checksum in {self.root / store.INDEX_FILE} does not match its file list")


def sample_model_input(
    batch: torch.Tensor, meta: dict, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Loader batch -> float32 model input x0 (N, C, H, W), on the batch's device, without host syncs.

    VAE data: a fresh latent z = mean + std * noise from the stored posterior, then (z - shift) * scale.
    Pixel data: the stored values. A generator must live on the batch's device.
    """
    if meta["kind"] == "pixels":
        return batch.float()
    mean, std = batch.float().chunk(2, dim=1)  # (N, C, H, W) each
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + std * noise - meta["shift"]) * meta["scale"]


class ResumableSampler(Sampler[int]):
    """Infinite, deterministic, distributed stream of sample indices.

    Epoch e is a permutation seeded by (seed, e), or the identity without shuffling, cut to a multiple
    of world_size (so every rank draws the same count and ranks stay in step) and dealt round-robin:
    rank r takes positions r, r + world_size, ... The stream of a rank starts after the `consumed`
    samples it already drew, so a resumed run draws exactly what the uninterrupted run would have.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        consumed: int = 0,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split across {world_size} ranks")
        if consumed < 0 or seed < 0:
            raise ValueError(f"consumed and seed must be non-negative, got {consumed} and {seed}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.consumed = seed, shuffle, consumed
        self.samples_per_rank = num_samples // world_size

    def state(self, consumed: int) -> dict[str, int]:
        """Where a rank stands after drawing `consumed` samples."""
        return {"epoch": consumed // self.samples_per_rank, "position": consumed % self.samples_per_rank}

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """(samples_per_rank,) indices this rank draws in `epoch`, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        state = self.state(self.consumed)
        epoch, position = state["epoch"], state["position"]
        while True:
            yield from self.epoch_indices(epoch)[position:].tolist()
            epoch, position = epoch + 1, 0


class _BatchesOf(Sampler[list[int]]):
    """Consecutive runs of `batch_size` indices; a batch may span two epochs, so that the samples
    consumed after k batches are always k * batch_size."""

    def __init__(self, sampler: ResumableSampler, batch_size: int):
        super().__init__()
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        indices = iter(self.sampler)
        while True:
            yield list(islice(indices, self.batch_size))


class _BatchReader(Dataset):
    """Maps a list of indices to a collated batch, in the loader workers."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.dataset, LatentDataset):
            return self.dataset.get_batch(indices)
        return tuple(default_collate([self.dataset[i] for i in indices]))


def _unchanged(batch):
    return batch


def make_loader(
    dataset: Dataset,
    per_gpu_batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    consumed: int = 0,
    num_workers: int = 2,
    shuffle: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Infinite iterator of (x, y) batches of this rank, starting after `consumed` samples of this rank
    (step * per_gpu_batch_size * grad_accum); resumed, it yields exactly the batches an uninterrupted
    run would. Reading is deterministic (no randomness in workers), so prefetching cannot change it."""
    if per_gpu_batch_size <= 0:
        raise ValueError(f"per_gpu_batch_size must be positive, got {per_gpu_batch_size}")
    sampler = ResumableSampler(
        len(dataset), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, consumed=consumed
    )
    loader = DataLoader(
        _BatchReader(dataset),
        batch_size=None,
        sampler=_BatchesOf(sampler, per_gpu_batch_size),
        collate_fn=_unchanged,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: a DataLoader otherwise draws its base seed from the global RNG when it
        # starts, and a resumed run would then see different training noise than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return (tuple(batch) for batch in loader)
