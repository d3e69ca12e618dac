"""The on-disk format of a preprocessed dataset (documented in the README, "Data").

    OUTPUT/
      index.json          metadata (below); written last, so its presence means the dataset is complete
      labels.npy          (num_samples,) int64, the class of every sample in dataset order
      shard-00000.npy     (n_0, *stored_shape) samples of shard 0 (a plain .npy: memory-mappable)
      images-00000.npy    with --keep-images (VAE data only): (n_0, 3, R, R) uint8 RGB, the clean ADM
                          center crop each sample of shard 0 was encoded from, row for row
      shard-00000.json    shard manifest: sample count, sha256s, labels, source images, skipped images
      ...
      skipped.txt         one line per unreadable image: relative path <TAB> reason
      run.json            the arguments of the run, compared on resume
      preprocess.log      log of every run into this folder
      .verified.json      written by `LatentDataset.verify`: the files it found intact (name, size, mtime)

Dataset order is shard order, then the order of the images inside a shard (sorted class, then path),
and with --flip each image is followed by its mirror image (in the image files too: the mirrored
sample's clean image is the mirrored crop).

Clean images (REPA's encoder input) are announced in index.json by `has_images`, `image_shape` [3, R, R]
and `image_dtype` "uint8"; each entry of `shards` then has `images_file` and `images_sha256`, and the
combined `checksum` covers them. Pixel data (--vae none) stores no second copy: its samples are the
images, so `has_images` is true without image files and the reader returns the samples as uint8 images.
An index without these keys (written before they existed) is VAE data without images, or pixel data.
"""

import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from errors import UserError

FORMAT_NAME = "sra-preprocessed-images"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LABELS_FILE = "labels.npy"
RUN_FILE = "run.json"
SKIPPED_FILE = "skipped.txt"
LOG_FILE = "preprocess.log"
VERIFIED_FILE = ".verified.json"
IMAGES_DTYPE = np.uint8  # clean images: RGB as decoded, exact
_TEMP_MARK = ".tmp-"


def shard_data_file(shard: int) -> str:
    return f"shard-{shard:05d}.npy"


def shard_manifest_file(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def shard_images_file(shard: int) -> str:
    return f"images-{shard:05d}.npy"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def combined_checksum(shard_sha256s: list[str], labels_sha256: str, image_sha256s: list[str] = ()) -> str:
    """One sha256 for the whole dataset: over the shard checksums in order, the labels checksum, then
    the image files' checksums (none for a dataset without them, whose checksum is thus unchanged)."""
    return hashlib.sha256("\n".join([*shard_sha256s, labels_sha256, *image_sha256s]).encode()).hexdigest()


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write then rename: an interrupted run leaves a temp file, never a half-written file under `path`."""
    temp = path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")
    with open(temp, "wb") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    with _atomic_file(path) as file:
        file.write(data)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_npy_atomic(path: Path, blocks: list[np.ndarray]) -> tuple[int, str]:
    """Write the rows of `blocks` (same dtype and row shape) as one .npy, byte for byte what np.save
    writes for their concatenation, without joining them in memory (a shard of clean images at 256 px
    with --flip is 1.6 GB). Atomic like `_write_atomic`; returns the row count and the file's sha256."""
    dtype, row_shape = blocks[0].dtype, blocks[0].shape[1:]
    if any(block.dtype != dtype or block.shape[1:] != row_shape for block in blocks):
        raise ValueError(f"blocks of {path} differ in dtype or row shape")
    num_rows = sum(len(block) for block in blocks)
    header = io.BytesIO()
    header_fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
    np.lib.format.write_array_header_1_0(header, {**header_fields, "shape": (num_rows, *row_shape)})
    rows = (np.ascontiguousarray(block).reshape(-1).view(np.uint8) for block in blocks)  # views, no copies
    digest = hashlib.sha256()
    with _atomic_file(path) as file:
        for data in [header.getvalue(), *rows]:
            digest.update(data)
            file.write(data)
    return num_rows, digest.hexdigest()


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file, read without loading or mapping it; UserError
    naming the file when it is not a .npy file (or its header is cut short)."""
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            if version not in read_header:
                raise ValueError(f"version {version}, not 1.0 or 2.0")
            shape, _, dtype = read_header[version](file)
        # numpy says ValueError for a short or malformed header, EOFError for an empty file.
        except (ValueError, EOFError) as error:
            raise UserError(f"{path} is not a readable .npy file ({error}): truncated or corrupt") from error
        return shape, dtype, file.tell()


def write_json(path: Path, content: dict) -> None:
    _write_atomic(path, (json.dumps(content, indent=1) + "\n").encode())


def read_json(path: Path) -> dict:
    """The JSON object in `path`; UserError naming the file when it is not one (truncated, corrupt)."""
    try:
        content = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}): it is truncated or corrupt") from error
    if not isinstance(content, dict):
        raise UserError(f"{path} holds a JSON {type(content).__name__}, not an object")
    return content


def write_shard(
    root: Path,
    shard: int,
    samples: np.ndarray | list[np.ndarray],
    labels: list[int],
    image_paths: list[str],
    skipped: list[tuple[str, str]],
    clean_images: np.ndarray | list[np.ndarray] | None = None,
) -> None:
    """Samples, then clean images (if kept), then the manifest: a shard counts as done only once its
    manifest exists. An array argument may be given as the list of its consecutive row blocks."""
    num_samples, sha256 = _write_npy_atomic(root / shard_data_file(shard), _as_blocks(samples))
    manifest = {"shard": shard, "num_samples": num_samples, "sha256": sha256}
    if clean_images is not None:
        images_file = shard_images_file(shard)
        num_images, images_sha256 = _write_npy_atomic(root / images_file, _as_blocks(clean_images))
        if num_images != num_samples:
            raise ValueError(f"shard {shard} has {num_samples} samples but {num_images} clean images")
        manifest |= {"images_file": images_file, "images_sha256": images_sha256}
    manifest |= {"labels": labels, "images": image_paths, "skipped": [list(entry) for entry in skipped]}
    write_json(root / shard_manifest_file(shard), manifest)


def _as_blocks(array: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    return [array] if isinstance(array, np.ndarray) else array


def is_shard_done(root: Path, shard: int) -> bool:
    return (root / shard_manifest_file(shard)).is_file() and (root / shard_data_file(shard)).is_file()


def remove_temp_files(root: Path) -> None:
    """Leftovers of interrupted writes; call only when no process is writing."""
    for path in root.glob(f".*{_TEMP_MARK}*"):
        path.unlink()


def finalize(root: Path, num_shards: int, description: dict) -> dict:
    """Gather the shard manifests into labels.npy, skipped.txt and index.json; return the index."""
    missing = [shard for shard in range(num_shards) if not is_shard_done(root, shard)]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {num_shards} shards are unfinished (first: {missing[0]}); "
            "rerun the same command to finish them"
        )
    manifests = [read_json(root / shard_manifest_file(shard)) for shard in range(num_shards)]
    skipped = [entry for manifest in manifests for entry in manifest["skipped"]]
    _write_atomic(root / SKIPPED_FILE, "".join(f"{path}\t{reason}\n" for path, reason in skipped).encode())
    labels = np.array([label for manifest in manifests for label in manifest["labels"]], dtype=np.int64)
    if len(labels) == 0:
        raise UserError(f"none of the {len(skipped)} input images could be read; see {root / SKIPPED_FILE}")
    labels_data = _npy_bytes(labels)
    _write_atomic(root / LABELS_FILE, labels_data)
    shards = [
        {"file": shard_data_file(m["shard"]), "num_samples": m["num_samples"], "sha256": m["sha256"]}
        | {key: m[key] for key in ("images_file", "images_sha256") if key in m}
        for m in manifests
    ]
    image_sha256s = [shard["images_sha256"] for shard in shards if "images_sha256" in shard]
    labels_sha256 = hashlib.sha256(labels_data).hexdigest()
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **description,
        "num_samples": len(labels),
        "num_images": sum(len(manifest["images"]) for manifest in manifests),
        "num_skipped": len(skipped),
        "labels_file": LABELS_FILE,
        "labels_sha256": labels_sha256,
        "shards": shards,
        "checksum": combined_checksum([shard["sha256"] for shard in shards], labels_sha256, image_sha256s),
    }
    write_json(root / INDEX_FILE, index)
    remove_temp_files(root)
    return index
