"""The trainer's side of a preprocessed dataset: a memory-mapped Dataset, the model input, and an
infinite loader that resumes exactly where a run stopped.

Class data yield (samples, labels); text-to-image data (index.json "condition": "text") yield (samples,
contexts), each sample with the context of one of its image's captions. Which caption sample i gets in
epoch e is a function of (caption seed, e, i) alone (`LatentDataset.caption_choice`), so the draw is the
same for any world size, batch size and worker count, and on resume.
"""

import errno
import logging
from collections.abc import Iterator
from copy import copy
from itertools import islice, repeat
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
# Text data ("condition": "text") add these.
_TEXT_KEYS = (
    "text_encoder", "text_encoder_sha256", "context_shape", "context_dtype", "num_captions",
    "caption_rows_file", "caption_rows_sha256", "null_context_file", "null_context_sha256",
)  # fmt: skip
_SHARD_TEXT_KEYS = ("contexts_file", "contexts_sha256", "num_contexts")
# The caption draw's stream, apart from the sampler's permutations (seeded by [seed, epoch]): epoch e's
# uniforms are default_rng([caption_seed, CAPTION_STREAM, e]).random(num_samples).
CAPTION_STREAM = 0x63617074  # "capt"


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
    condition = meta.get("condition", "class")
    if condition not in store.CONDITIONS:
        raise UserError(f"{index_path} has condition {condition!r}, neither 'class' nor 'text'; {_RECREATE}")
    image_files = meta.get("has_images") and meta.get("kind") == "vae"
    text = condition == "text"
    index_keys = _INDEX_KEYS + (_IMAGE_KEYS if image_files else ()) + (_TEXT_KEYS if text else ())
    missing = [key for key in index_keys if key not in meta]
    shards = meta.get("shards", [])
    if not isinstance(shards, list) or not all(isinstance(entry, dict) for entry in shards):
        missing.append("shards as a list of objects")
    else:
        shard_keys = _SHARD_KEYS + (_SHARD_IMAGE_KEYS if image_files else ()) + (_SHARD_TEXT_KEYS if text else ())
        missing += sorted({f"shards[].{key}" for entry in shards for key in shard_keys if key not in entry})
    if missing:
        raise UserError(f"{index_path} is malformed: it lacks {', '.join(missing)}; {_RECREATE}")
    if meta["kind"] not in ("vae", "pixels"):
        raise UserError(f"{index_path} has kind {meta['kind']!r}, neither 'vae' nor 'pixels'; {_RECREATE}")
    totals = [("num_samples", "num_samples", "samples")]  # (key in shards, key in the index, what)
    totals += [("num_contexts", "num_captions", "contexts")] if text else []
    for shard_key, total_key, what in totals:
        in_shards = sum(entry[shard_key] for entry in shards)
        if in_shards != meta[total_key]:
            raise UserError(
                f"{index_path} is malformed: its shards hold {in_shards} {what}, its {total_key} says "
                f"{meta[total_key]}; {_RECREATE}"
            )
    return meta


class LatentDataset(Dataset):
    """(stored sample, label) pairs read from memory-mapped shards; with `with_images`, (stored sample,
    label, clean image) triples. Text data give a context (L, D) float16 in place of the label: the
    encoded caption drawn for the sample (`caption_choice`, epoch 0 for `dataset[i]`).

    A sample is the posterior moments (2C, H, W) float16 for VAE data (turn a batch into model input
    with `sample_model_input`), or the pixels (3, H, W) float32 in [-1, 1] for pixel data. A clean
    image (REPA's encoder input) is the ADM center crop the sample was made from, (3, R, R) uint8 RGB:
    read from the image files of VAE data preprocessed with --keep-images, or the stored pixels
    themselves for pixel data. `has_images` says whether a dataset has them.

    Opening checks the index, that every file it lists (the image files only with `with_images`) exists
    with the shape, dtype and size the index implies, the model's shape and classes, the labels, and for
    text data the caption rows; `verify` also recomputes the checksums. Every problem raises UserError
    naming the file. `caption_seed` seeds the caption draw of text data (`make_loader` uses its own seed).
    """

    def __init__(
        self,
        root: str | Path,
        expected_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        with_images: bool = False,
        caption_seed: int = 0,
    ):
        if caption_seed < 0:
            raise ValueError(f"caption_seed must be non-negative, got {caption_seed}")
        self.root = Path(root)
        self.meta = _read_index(self.root)
        self.with_images = with_images
        self.caption_seed = caption_seed
        self._uniforms: dict[tuple[int, int], np.ndarray] = {}  # (seed, epoch) -> (N,) caption draw uniforms
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
        if self.condition == "text":
            self._open_text()

    @property
    def condition(self) -> str:
        """The condition: "class" (labels) or "text" (captions); an index without it is class data."""
        return self.meta.get("condition", "class")

    @property
    def context_shape(self) -> tuple[int, int] | None:
        """(L, D) of a context (77 tokens x 768 for CLIP ViT-L/14) for text data; None for class data."""
        return tuple(self.meta["context_shape"]) if self.condition == "text" else None

    def _open_text(self) -> None:
        """Check the context files, caption_rows.npy and null_context.npy; keep the caption rows."""
        shape, dtype = self.context_shape, self.meta["context_dtype"]
        for shard in self.meta["shards"]:
            self._check_npy(shard["contexts_file"], (shard["num_contexts"], *shape), dtype)
        self._check_npy(self.meta["null_context_file"], shape, dtype)
        self._check_npy(self.meta["caption_rows_file"], (len(self), 2), np.int64)
        # (N, 2) int64: [first global context row, number of captions] of every sample
        self.caption_rows = np.load(self.root / self.meta["caption_rows_file"])
        first, count = self.caption_rows[:, 0], self.caption_rows[:, 1]
        bad = np.flatnonzero((count < 1) | (first < 0) | (first + count > self.meta["num_captions"]))
        if len(bad):
            i = int(bad[0])
            raise UserError(
                f"{self.root / self.meta['caption_rows_file']} is corrupt: sample {i} has {count[i]} captions from "
                f"row {first[i]}, outside the {self.meta['num_captions']} captions of the dataset; {_RECREATE}"
            )
        counts = [shard["num_contexts"] for shard in self.meta["shards"]]
        self._context_ends = np.cumsum(counts)  # global context row g lives in the first shard ending after g
        self._context_starts = self._context_ends - counts

    def _require_text(self, what: str) -> None:
        if self.condition != "text":
            raise UserError(
                f"{self.root} holds class-conditional data (condition {self.condition!r}): it has no {what}; "
                "preprocess the images with --captions for text-to-image data"
            )

    def null_context(self) -> torch.Tensor:
        """(L, D) float32: the encoded empty caption, the null condition for guidance (text data only)."""
        self._require_text("null context")
        return torch.from_numpy(np.load(self.root / self.meta["null_context_file"])).float()

    def with_caption_seed(self, seed: int) -> "LatentDataset":
        """This dataset drawing captions with `seed` (a shallow copy; the same object if the seed is its own)."""
        if seed == self.caption_seed:
            return self
        if seed < 0:
            raise ValueError(f"caption_seed must be non-negative, got {seed}")
        other = copy(self)
        other.caption_seed, other._uniforms = seed, {}
        return other

    def _caption_uniforms(self, epoch: int) -> np.ndarray:
        """(N,) float64 in [0, 1): default_rng([caption_seed, CAPTION_STREAM, epoch]).random(N). The two
        latest epochs are kept (a batch may span two)."""
        key = (self.caption_seed, epoch)
        if key not in self._uniforms:
            if len(self._uniforms) >= 2:
                del self._uniforms[next(iter(self._uniforms))]
            self._uniforms[key] = np.random.default_rng([self.caption_seed, CAPTION_STREAM, epoch]).random(len(self))
        return self._uniforms[key]

    def caption_choice(self, indices, epochs=None) -> np.ndarray:
        """(N,) int64: which of its image's captions sample indices[j] gets in epochs[j] (an int for all,
        None for epoch 0): k = floor(u[i] * count_i), u = the epoch's uniforms. Text data only."""
        self._require_text("captions")
        indices = np.asarray(indices, dtype=np.int64)
        epochs = np.broadcast_to(np.asarray(0 if epochs is None else epochs, dtype=np.int64), indices.shape)
        counts = self.caption_rows[indices, 1]
        choice = np.empty(len(indices), dtype=np.int64)
        for epoch in np.unique(epochs):
            drawn = epochs == epoch
            uniforms = self._caption_uniforms(int(epoch))[indices[drawn]]
            # floor; the minimum only guards the float product against rounding up to the count
            choice[drawn] = np.minimum((uniforms * counts[drawn]).astype(np.int64), counts[drawn] - 1)
        return choice

    def _contexts(self, indices: np.ndarray, epochs) -> np.ndarray:
        """(N, L, D) stored contexts of the captions drawn for these samples in these epochs."""
        rows = self.caption_rows[indices, 0] + self.caption_choice(indices, epochs)
        shards = np.searchsorted(self._context_ends, rows, side="right")
        local = rows - self._context_starts[shards]
        return self._gather("contexts_file", shards, local, self.meta["context_shape"], self.meta["context_dtype"])

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
        """The memory map of a shard's samples (key "file"), clean images ("images_file") or contexts
        ("contexts_file")."""
        entry = self.meta["shards"][shard]
        return self._map(entry[key], entry["num_contexts" if key == "contexts_file" else "num_samples"])

    def __getstate__(self) -> dict:
        # Loader workers reopen the memory maps rather than receive copies of them.
        return {**self.__dict__, "_maps": {}, "_uniforms": {}}

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def _as_output(self, stored: np.ndarray) -> torch.Tensor:
        stored = torch.from_numpy(stored)
        return pixels_to_unit_range(stored) if self.meta["kind"] == "pixels" else stored

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor] | tuple[torch.Tensor, ...]:
        """(sample, label) or, for text data, (sample, context (L, D) float16 of its epoch-0 caption); with
        `with_images`, the clean image (3, R, R) uint8 third."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        shard = int(np.searchsorted(self._shard_ends, i, side="right"))
        row = i - int(self._shard_starts[shard])
        stored = np.array(self._shard_file(shard, "file")[row])
        if self.condition == "text":
            condition = torch.from_numpy(self._contexts(np.array([i]), 0)[0])
        else:
            condition = int(self.labels[i])
        if not self.with_images:
            return self._as_output(stored), condition
        image = np.array(self._shard_file(shard, "images_file")[row]) if self._has_image_files else stored
        return self._as_output(stored), condition, torch.from_numpy(image)

    def _gather(self, key: str, shards: np.ndarray, rows: np.ndarray, shape: list[int], dtype) -> np.ndarray:
        """Rows of the shards' files under `key`: one fancy-indexed read per shard touched."""
        gathered = np.empty((len(rows), *shape), dtype=dtype)
        for shard in np.unique(shards):
            in_shard = shards == shard
            gathered[in_shard] = self._shard_file(int(shard), key)[rows[in_shard]]
        return gathered

    def get_batch(
        self, indices: list[int], epochs: list[int] | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Samples and labels (N,) int64 for many indices at once, or for text data samples and contexts
        (N, L, D) float16, each sample's caption drawn for its epoch in `epochs` (one per index, one int
        for all, or None: epoch 0); with `with_images` the clean images (N, 3, R, R) uint8 third."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self._shard_ends, indices, side="right")
        rows = indices - self._shard_starts[shards]
        stored = self._gather("file", shards, rows, self.meta["stored_shape"], self.meta["stored_dtype"])
        if self.condition == "text":
            samples, labels = self._as_output(stored), torch.from_numpy(self._contexts(indices, epochs))
        else:
            samples, labels = self._as_output(stored), torch.from_numpy(self.labels[indices])
        if not self.with_images:
            return samples, labels
        if not self._has_image_files:
            return samples, labels, torch.from_numpy(stored)  # pixel data: the stored pixels are the images
        images = self._gather("images_file", shards, rows, self.meta["image_shape"], self.meta["image_dtype"])
        return samples, labels, torch.from_numpy(images)

    def _checked_files(self) -> dict[str, list[tuple[str, str]]]:
        """(file name, sha256 in the index) of every data file, by group, in the order of the combined
        checksum: shards, labels, images, text (contexts, caption rows, null context)."""
        shards, meta = self.meta["shards"], self.meta
        text = []
        if self.condition == "text":
            text = [(shard["contexts_file"], shard["contexts_sha256"]) for shard in shards]
            text += [(meta["caption_rows_file"], meta["caption_rows_sha256"])]
            text += [(meta["null_context_file"], meta["null_context_sha256"])]
        return {
            "shards": [(shard["file"], shard["sha256"]) for shard in shards],
            "labels": [(meta["labels_file"], meta["labels_sha256"])],
            "images": [(shard["images_file"], shard["images_sha256"]) for shard in shards if self._has_image_files],
            "text": text,
        }

    def _file_state(self, name: str) -> list[int]:
        path = self.root / name
        if not path.is_file():
            raise UserError(f"{path}, listed in {store.INDEX_FILE}, is missing; {_RECREATE}")
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def verify(self, stamp: bool = True) -> bool:
        """Recompute the sha256 of every data file (sample shards, labels, image files, the context files,
        caption rows and null context of text data) against the index;
        a mismatch raises UserError naming the file. Returns whether it hashed (False: the stamp matched).

        With `stamp`, a full successful check is remembered in `.verified.json` in the dataset folder,
        keyed on the index checksum and every file's name, size and mtime_ns; a later call that finds
        them unchanged skips the hashing (ImageNet's files take minutes to read). A folder that cannot
        be written is verified all the same, each time. With several processes, let the main one verify
        first (accelerate's `main_process_first`): the others then find its stamp.
        """
        groups = self._checked_files()
        sums = {group: [expected for _, expected in files] for group, files in groups.items()}
        checksum = store.combined_checksum(sums["shards"], sums["labels"][0], sums["images"], sums["text"])
        files = [entry for group in groups.values() for entry in group]
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

    def draws(self) -> Iterator[tuple[int, int]]:
        """(index, epoch) pairs: the stream of `iter(self)`, each index with the epoch it is drawn in."""
        state = self.state(self.consumed)
        epoch, position = state["epoch"], state["position"]
        while True:
            yield from zip(self.epoch_indices(epoch)[position:].tolist(), repeat(epoch))
            epoch, position = epoch + 1, 0


class _BatchesOf(Sampler[tuple[list[int], list[int]]]):
    """Consecutive runs of `batch_size` indices, with the epoch of each; a batch may span two epochs,
    so that the samples consumed after k batches are always k * batch_size."""

    def __init__(self, sampler: ResumableSampler, batch_size: int):
        super().__init__()
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        draws = self.sampler.draws()
        while True:
            indices, epochs = zip(*islice(draws, self.batch_size), strict=True)
            yield list(indices), list(epochs)


class _BatchReader(Dataset):
    """Maps (indices, their epochs) to a collated batch, in the loader workers."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, batch: tuple[list[int], list[int]]) -> tuple[torch.Tensor, ...]:
        indices, epochs = batch
        if isinstance(self.dataset, LatentDataset):
            return self.dataset.get_batch(indices, epochs)
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
    grad_accum); resumed, it yields exactly the batches an uninterrupted run would. For text data y is
    the contexts (N, L, D) float16, each sample's caption drawn for the epoch it is drawn in, with `seed`
    as the caption seed (the dataset's own `caption_seed` is not used here). Reading is deterministic (no
    randomness in workers: the caption draw is a function of seed, epoch and index), so prefetching,
    world size and worker count cannot change it."""
    if per_gpu_batch_size <= 0:
        raise ValueError(f"per_gpu_batch_size must be positive, got {per_gpu_batch_size}")
    if isinstance(dataset, LatentDataset):
        dataset = dataset.with_caption_seed(seed)
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
