"""The trainer's side of a preprocessed dataset: a memory-mapped Dataset, the model input, and an
infinite loader that resumes exactly where a run stopped."""

import errno
import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from errors import UserError
from preprocessing import store
from preprocessing.image import pixels_to_unit_range

log = logging.getLogger(__name__)

_RECREATE = "re-create the dataset with `python -m preprocessing` into a new folder, or restore the file"
_INDEX_KEYS = (
    "kind", "sample_shape", "stored_shape", "stored_dtype", "num_classes", "num_samples", "shards",
    "labels_file", "labels_sha256", "checksum",
)  # fmt: skip
_SHARD_KEYS = ("file", "num_samples", "sha256")
# VAE data with image files (has_images) adds these, to the index and to each of its shards.
_IMAGE_KEYS, _SHARD_IMAGE_KEYS = ("image_shape", "image_dtype"), ("images_file", "images_sha256")


def _read_index(root: Path) -> dict:
    """index.json, checked to be this format and to hold every key the reader uses."""
    index_path = root / store.INDEX_FILE
    if not index_path.is_file():
        raise UserError(
            f"{root} has no {store.INDEX_FILE}: it is not a preprocessed dataset, or "
            "`python -m preprocessing` did not finish (rerun the same command to resume it)"
        )
    try:
        meta = store.read_json(index_path)
    except UserError as error:
        raise UserError(f"{error}; {_RECREATE}") from error
    if meta.get("format") != store.FORMAT_NAME or meta.get("format_version") != store.FORMAT_VERSION:
        raise UserError(
            f"{index_path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this code reads {store.FORMAT_NAME!r} version {store.FORMAT_VERSION}"
        )
    image_files = meta.get("has_images") and meta.get("kind") == "vae"
    missing = [key for key in _INDEX_KEYS + (_IMAGE_KEYS if image_files else ()) if key not in meta]
    shards = meta.get("shards", [])
    if not isinstance(shards, list) or not all(isinstance(entry, dict) for entry in shards):
        missing.append("shards as a list of objects")
    else:
        shard_keys = _SHARD_KEYS + (_SHARD_IMAGE_KEYS if image_files else ())
        missing += sorted({f"shards[].{key}" for entry in shards for key in shard_keys if key not in entry})
    if missing:
        raise UserError(f"{index_path} is malformed: it lacks {', '.join(missing)}; {_RECREATE}")
    if meta["kind"] not in ("vae", "pixels"):
        raise UserError(f"{index_path} has kind {meta['kind']!r}, neither 'vae' nor 'pixels'; {_RECREATE}")
    in_shards = sum(entry["num_samples"] for entry in shards)
    if in_shards != meta["num_samples"]:
        raise UserError(
            f"{index_path} is malformed: its shards hold {in_shards} samples, its num_samples says "
            f"{meta['num_samples']}; {_RECREATE}"
        )
    return meta


class LatentDataset(Dataset):
    """(stored sample, label) pairs read from memory-mapped shards; with `with_images`, (stored sample,
    label, clean image) triples.

    A sample is the posterior moments (2C, H, W) float16 for VAE data (turn a batch into model input
    with `sample_model_input`), or the pixels (3, H, W) float32 in [-1, 1] for pixel data. A clean
    image (REPA's encoder input) is the ADM center crop the sample was made from, (3, R, R) uint8 RGB:
    read from the image files of VAE data preprocessed with --keep-images, or the stored pixels
    themselves for pixel data. `has_images` says whether a dataset has them.

    Opening checks the index, that every file it lists (the image files only with `with_images`) exists
    with the shape, dtype and size the index implies, the model's shape and classes, and the labels;
    `verify` also recomputes the checksums. Every problem raises UserError naming the file.
    """

    def __init__(
        self,
        root: str | Path,
        expected_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        with_images: bool = False,
    ):
        self.root = Path(root)
        self.meta = _read_index(self.root)
        self.with_images = with_images
        self._check_model(expected_shape, num_classes)
        if with_images and not self.has_images:
            raise UserError(
                f"{self.root} has no clean images (REPA's encoder needs them): its VAE samples were "
                "preprocessed without --keep-images; rerun `python -m preprocessing` with the same arguments "
                "and --keep-images into a new --output folder"
            )
        counts = [shard["num_samples"] for shard in self.meta["shards"]]
        self._shard_ends = np.cumsum(counts)  # sample i lives in the first shard whose end exceeds i
        self._shard_starts = self._shard_ends - counts
        self._maps: dict[str, np.ndarray] = {}  # file name -> memory map, opened on first use by a process
        for shard in self.meta["shards"]:
            count = shard["num_samples"]
            self._check_npy(shard["file"], (count, *self.meta["stored_shape"]), self.meta["stored_dtype"])
            if with_images and self._has_image_files:
                image_shape, image_dtype = (count, *self.meta["image_shape"]), self.meta["image_dtype"]
                self._check_npy(shard["images_file"], image_shape, image_dtype)
        self._check_npy(self.meta["labels_file"], (len(self),), np.int64)
        self.labels = np.load(self.root / self.meta["labels_file"])  # (N,) int64
        self._check_labels(num_classes)

    @property
    def has_images(self) -> bool:
        """Whether clean images can be read: pixel data (the samples are the images), or VAE data
        preprocessed with --keep-images."""
        return self.meta["kind"] == "pixels" or bool(self.meta.get("has_images"))

    @property
    def _has_image_files(self) -> bool:
        return self.meta["kind"] == "vae" and self.has_images

    def _check_model(self, expected_shape, num_classes) -> None:
        sample_shape = tuple(self.meta["sample_shape"])
        if expected_shape is not None and tuple(expected_shape) != sample_shape:
            raise UserError(
                f"the model expects inputs of shape {tuple(expected_shape)}, but {self.root} holds "
                f"{self.meta['kind']} samples of shape {sample_shape}"
            )
        if num_classes is not None and num_classes != self.meta["num_classes"]:
            raise UserError(
                f"the model has num_classes={num_classes}, but {self.root} has "
                f"{self.meta['num_classes']} classes"
            )

    def _check_npy(self, name: str, shape: tuple[int, ...], dtype) -> None:
        """`name` exists and is a complete .npy of this shape and dtype (a truncated file is caught here,
        not by a memory map failing in a loader worker)."""
        path = self.root / name
        if not path.is_file():
            raise UserError(f"{path}, listed in {store.INDEX_FILE}, is missing; {_RECREATE}")
        try:
            stored_shape, stored_dtype, offset = store.read_npy_header(path)
        except UserError as error:
            raise UserError(f"{error}; {_RECREATE}") from error
        shape, dtype = tuple(shape), np.dtype(dtype)
        if stored_shape != shape or stored_dtype != dtype:
            raise UserError(f"{path} holds {stored_dtype} {stored_shape}, the index says {dtype} {shape}")
        size, expected_size = path.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
        if size != expected_size:
            raise UserError(
                f"{path} has {size} bytes, a .npy of {dtype} {shape} has {expected_size}: it is truncated or "
                f"corrupt; {_RECREATE}"
            )

    def _check_labels(self, num_classes: int | None) -> None:
        limit = self.meta["num_classes"] if num_classes is None else num_classes
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= limit):
            raise UserError(
                f"labels span [{self.labels.min()}, {self.labels.max()}], outside the "
                f"{limit} classes [0, {limit - 1}]"
            )

    def _map(self, name: str, num_samples: int) -> np.ndarray:
        if name not in self._maps:
            # An empty shard (every image unreadable) cannot be memory-mapped; it is never indexed anyway.
            try:
                self._maps[name] = np.load(self.root / name, mmap_mode=None if num_samples == 0 else "r")
            except OSError as error:
                if error.errno != errno.EMFILE:
                    raise
                # Each memory map holds a file descriptor, and a reading process maps every file it reads.
                raise OSError(
                    error.errno,
                    f"{len(self._maps)} files of {self.root} are open and the process may open no more "
                    "files: raise `ulimit -n`, or preprocess again with a larger --images-per-shard",
                ) from error
        return self._maps[name]

    def _shard_file(self, shard: int, key: str) -> np.ndarray:
        """The memory map of a shard's samples (key "file") or clean images (key "images_file")."""
        entry = self.meta["shards"][shard]
        return self._map(entry[key], entry["num_samples"])

    def __getstate__(self) -> dict:
        # Loader workers reopen the memory maps rather than receive copies of them.
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def _as_output(self, stored: np.ndarray) -> torch.Tensor:
        stored = torch.from_numpy(stored)
        return pixels_to_unit_range(stored) if self.meta["kind"] == "pixels" else stored

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        shard = int(np.searchsorted(self._shard_ends, i, side="right"))
        row = i - int(self._shard_starts[shard])
        stored = np.array(self._shard_file(shard, "file")[row])
        if not self.with_images:
            return self._as_output(stored), int(self.labels[i])
        image = np.array(self._shard_file(shard, "images_file")[row]) if self._has_image_files else stored
        return self._as_output(stored), int(self.labels[i]), torch.from_numpy(image)

    def _gather(self, key: str, shards: np.ndarray, rows: np.ndarray, shape: list[int], dtype) -> np.ndarray:
        """Rows of the shards' files under `key`: one fancy-indexed read per shard touched."""
        gathered = np.empty((len(rows), *shape), dtype=dtype)
        for shard in np.unique(shards):
            in_shard = shards == shard
            gathered[in_shard] = self._shard_file(int(shard), key)[rows[in_shard]]
        return gathered

    def get_batch(
        self, indices: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Samples and labels for many indices at once, and with `with_images` the clean images
        (N, 3, R, R) uint8."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self._shard_ends, indices, side="right")
        rows = indices - self._shard_starts[shards]
        stored = self._gather("file", shards, rows, self.meta["stored_shape"], self.meta["stored_dtype"])
        samples, labels = self._as_output(stored), torch.from_numpy(self.labels[indices])
        if not self.with_images:
            return samples, labels
        if not self._has_image_files:
            return samples, labels, torch.from_numpy(stored)  # pixel data: the stored pixels are the images
        images = self._gather("images_file", shards, rows, self.meta["image_shape"], self.meta["image_dtype"])
        return samples, labels, torch.from_numpy(images)

    def _checked_files(self) -> list[tuple[str, str]]:
        """(file name, sha256 in the index) of every data file, in the order of the combined checksum."""
        shards = self.meta["shards"]
        images = [(shard["images_file"], shard["images_sha256"]) for shard in shards if self._has_image_files]
        return [
            *[(shard["file"], shard["sha256"]) for shard in shards],
            (self.meta["labels_file"], self.meta["labels_sha256"]),
            *images,
        ]

    def _file_state(self, name: str) -> list[int]:
        path = self.root / name
        if not path.is_file():
            raise UserError(f"{path}, listed in {store.INDEX_FILE}, is missing; {_RECREATE}")
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def verify(self, stamp: bool = True) -> bool:
        """Recompute the sha256 of every data file (sample shards, labels, image files) against the index;
        a mismatch raises UserError naming the file. Returns whether it hashed (False: the stamp matched).

        With `stamp`, a full successful check is remembered in `.verified.json` in the dataset folder,
        keyed on the index checksum and every file's name, size and mtime_ns; a later call that finds
        them unchanged skips the hashing (ImageNet's files take minutes to read). A folder that cannot
        be written is verified all the same, each time. With several processes, let the main one verify
        first (accelerate's `main_process_first`): the others then find its stamp.
        """
        files = self._checked_files()
        sums, num_shards = [expected for _, expected in files], len(self.meta["shards"])
        checksum = store.combined_checksum(sums[:num_shards], sums[num_shards], sums[num_shards + 1 :])
        if checksum != self.meta["checksum"]:
            raise UserError(
                f"the checksum in {self.root / store.INDEX_FILE} does not match its file list: the index is "
                f"corrupt; {_RECREATE}"
            )
        # Sizes and times are taken before hashing: a file that changes while it is read is hashed again.
        file_states = {name: self._file_state(name) for name, _ in files}
        state = {"checksum": self.meta["checksum"], "files": file_states}
        stamp_path = self.root / store.VERIFIED_FILE
        if stamp and _read_stamp(stamp_path) == state:
            return False
        for name, expected in files:
            actual = store.sha256_file(self.root / name)
            if actual != expected:
                raise UserError(
                    f"{self.root / name} has sha256 {actual}, {store.INDEX_FILE} says {expected}: "
                    f"the dataset is corrupt; {_RECREATE}"
                )
        if stamp:
            try:
                store.write_json(stamp_path, state)
            except OSError as error:
                log.warning("verified %s, but cannot record it in %s (%s)", self.root, stamp_path.name, error)
        return True


def _read_stamp(path: Path) -> dict | None:
    try:
        return store.read_json(path)
    except (OSError, UserError):  # none yet, or unreadable: verify again
        return None


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

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
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
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Infinite iterator of (x, y) batches of this rank, or (x, y, clean images) from a LatentDataset
    opened `with_images`, starting after `consumed` samples of this rank (step * per_gpu_batch_size *
    grad_accum); resumed, it yields exactly the batches an uninterrupted run would. Reading is
    deterministic (no randomness in workers), so prefetching cannot change it."""
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
