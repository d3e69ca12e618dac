"""The on-disk format of a preprocessed dataset (documented in the README, "Data").

    OUTPUT/
      index.json          metadata (below); written last, so its presence means the dataset is complete
      labels.npy          (num_samples,) int64, the class of every sample in dataset order
      shard-00000.npy     (n_0, *stored_shape) samples of shard 0 (a plain .npy: memory-mappable)
      shard-00000.json    shard manifest: sample count, sha256, labels, source images, skipped images
      ...
      skipped.txt         one line per unreadable image: relative path <TAB> reason
      run.json            the arguments of the run, compared on resume
      preprocess.log      log of every run into this folder

Dataset order is shard order, then the order of the images inside a shard (sorted class, then path),
and with --flip each image is followed by its mirror image.
"""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

FORMAT_NAME = "sra-preprocessed-images"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LABELS_FILE = "labels.npy"
RUN_FILE = "run.json"
SKIPPED_FILE = "skipped.txt"
LOG_FILE = "preprocess.log"
_TEMP_MARK = ".tmp-"


def shard_data_file(shard: int) -> str:
    return f"shard-{shard:05d}.npy"


def shard_manifest_file(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def combined_checksum(shard_sha256s: list[str], labels_sha256: str) -> str:
    """One sha256 for the whole dataset: over the shard checksums in order, then the labels checksum."""
    return hashlib.sha256("\n".join([*shard_sha256s, labels_sha256]).encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write then rename: an interrupted run leaves a temp file, never a half-written file under `path`."""
    temp = path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, read without loading or mapping it."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in read_header:
            raise ValueError(f"{path} is a .npy file of version {version}, not 1.0 or 2.0")
        shape, _, dtype = read_header[version](file)
    return shape, dtype


def write_json(path: Path, content: dict) -> None:
    _write_atomic(path, (json.dumps(content, indent=1) + "\n").encode())


def read_json(path: Path) -> dict:
    with open(path) as file:
        return json.load(file)


def write_shard(
    root: Path,
    shard: int,
    samples: np.ndarray,
    labels: list[int],
    images: list[str],
    skipped: list[tuple[str, str]],
) -> None:
    """Data first, manifest second: a shard counts as done only once its manifest exists."""
    data = _npy_bytes(samples)
    _write_atomic(root / shard_data_file(shard), data)
    manifest = {
        "shard": shard,
        "num_samples": len(samples),
        "sha256": hashlib.sha256(data).hexdigest(),
        "labels": labels,
        "images": images,
        "skipped": [list(entry) for entry in skipped],
    }
    write_json(root / shard_manifest_file(shard), manifest)


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
    labels = np.array([label for manifest in manifests for label in manifest["labels"]], dtype=np.int64)
    if len(labels) == 0:
        raise RuntimeError(f"no image could be read; the reasons are in the shard manifests in {root}")
    labels_data = _npy_bytes(labels)
    _write_atomic(root / LABELS_FILE, labels_data)
    skipped = [entry for manifest in manifests for entry in manifest["skipped"]]
    _write_atomic(root / SKIPPED_FILE, "".join(f"{path}\t{reason}\n" for path, reason in skipped).encode())
    shards = [
        {"file": shard_data_file(m["shard"]), "num_samples": m["num_samples"], "sha256": m["sha256"]}
        for m in manifests
    ]
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
        "checksum": combined_checksum([shard["sha256"] for shard in shards], labels_sha256),
    }
    write_json(root / INDEX_FILE, index)
    remove_temp_files(root)
    return index
