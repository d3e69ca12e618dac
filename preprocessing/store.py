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

Text-to-image data (--captions) adds, in the same folder:

      contexts-00000.npy  (m_0, L, D) float16: the encoded captions of shard 0's images, each image's
                          captions consecutive, in file order (L = 77 tokens, D = 768 for CLIP ViT-L/14)
      caption_rows.npy    (num_samples, 2) int64: per sample [first global context row, number of captions];
                          the global row of row r of shard k is r + the rows of shards 0..k-1
      null_context.npy    (L, D) float16: the encoded empty caption, the null condition for guidance

With --flip a mirrored sample has the rows of its image. The shard manifest adds `contexts_file`,
`contexts_sha256`, `num_contexts`, `caption_counts` (per sample) and `captions` (the texts, per image of
`images`). index.json says `"condition": "text"` (class data says "class"; an index without the key is
class data) and adds `text_encoder`, `text_encoder_sha256`, `context_shape` [L, D], `context_dtype`
"float16", `num_captions`, `caption_rows_file`, `caption_rows_sha256`, `null_context_file`,
`null_context_sha256`, and in each entry of `shards` its `contexts_file`, `contexts_sha256` and
`num_contexts`. Every sample of text data has label 0 (one class, "text"), so labels.npy is as for
class data. The combined `checksum` covers the context files, caption_rows.npy and null_context.npy.
"""

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
CAPTION_ROWS_FILE = "caption_rows.npy"
NULL_CONTEXT_FILE = "null_context.npy"
CONDITIONS = ("class", "text")  # index.json "condition"; an index without it is class data
IMAGES_DTYPE = np.uint8  # clean images: RGB as decoded, exact
_TEMP_MARK = ".tmp-"


def shard_data_file(shard: int) -> str:
    return f"shard-{shard:05d}.npy"


def shard_manifest_file(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def shard_images_file(shard: int) -> str:
    return f"images-{shard:05d}.npy"


def shard_contexts_file(shard: int) -> str:
    return f"contexts-{shard:05d}.npy"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def combined_checksum(
    shard_sha256s: list[str], labels_sha256: str, image_sha256s: list[str] = (), text_sha256s: list[str] = ()
) -> str:
    """One sha256 for the whole dataset: over the shard checksums in order, the labels checksum, the
    image files' checksums, then the text files' (the context files in shard order, caption_rows.npy,
    null_context.npy). A dataset without images or text has none of them, and its checksum is thus
    what it was before they existed."""
    sums = [*shard_sha256s, labels_sha256, *image_sha256s, *text_sha256s]
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()


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


@dataclass(frozen=True)
class RowStream:
    """The rows of a .npy made while it is written: `blocks` yields `num_rows` rows in all, as arrays
    (n, *row_shape) of `dtype` (a shard of contexts is 2.4 GB for MS-COCO: it is never whole in memory)."""

    num_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Iterable[np.ndarray]


def _write_npy_atomic(path: Path, blocks: list[np.ndarray] | RowStream) -> tuple[int, str]:
    """Write the rows of `blocks` (same dtype and row shape; a list, or a RowStream made as it is written)
    as one .npy, byte for byte what np.save writes for their concatenation, without joining them in memory
    (a shard of clean images at 256 px with --flip is 1.6 GB). Atomic like `_write_atomic`; returns the
    row count and the file's sha256."""
    if isinstance(blocks, RowStream):
        stream = blocks
    else:
        dtype, row_shape = blocks[0].dtype, blocks[0].shape[1:]
        if any(block.dtype != dtype or block.shape[1:] != row_shape for block in blocks):
            raise ValueError(f"blocks of {path} differ in dtype or row shape")
        stream = RowStream(sum(len(block) for block in blocks), row_shape, dtype, blocks)
    dtype, row_shape = np.dtype(stream.dtype), tuple(stream.row_shape)
    header = io.BytesIO()
    header_fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
    np.lib.format.write_array_header_1_0(header, {**header_fields, "shape": (stream.num_rows, *row_shape)})
    digest, written = hashlib.sha256(), 0
    with _atomic_file(path) as file:
        digest.update(header.getvalue())
        file.write(header.getvalue())
        for block in stream.blocks:
            if block.dtype != dtype or block.shape[1:] != row_shape:
                raise ValueError(f"blocks of {path} differ in dtype or row shape")
            data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)  # a view, no copy
            digest.update(data)
            file.write(data)
            written += len(block)
        if written != stream.num_rows:
            raise ValueError(f"{path} was announced with {stream.num_rows} rows, its blocks hold {written}")
    return stream.num_rows, digest.hexdigest()


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


@dataclass(frozen=True)
class ShardText:
    """The text of a shard of text-to-image data: its images' captions and their contexts."""

    contexts: np.ndarray | list[np.ndarray] | RowStream  # (M, L, D) float16, the captions of `captions` in order
    captions: list[list[str]]  # per source image of the shard (its `image_paths`), in file order
    caption_counts: list[int]  # per sample: the captions of its image (a mirrored sample's too)


def write_shard(
    root: Path,
    shard: int,
    samples: np.ndarray | list[np.ndarray],
    labels: list[int],
    image_paths: list[str],
    skipped: list[tuple[str, str]],
    clean_images: np.ndarray | list[np.ndarray] | None = None,
    text: ShardText | None = None,
) -> None:
    """Samples, then clean images (if kept), then contexts (text data), then the manifest: a shard counts
    as done only once its manifest exists. An array argument may be given as the list of its consecutive
    row blocks."""
    num_samples, sha256 = _write_npy_atomic(root / shard_data_file(shard), _as_blocks(samples))
    manifest = {"shard": shard, "num_samples": num_samples, "sha256": sha256}
    if clean_images is not None:
        images_file = shard_images_file(shard)
        num_images, images_sha256 = _write_npy_atomic(root / images_file, _as_blocks(clean_images))
        if num_images != num_samples:
            raise ValueError(f"shard {shard} has {num_samples} samples but {num_images} clean images")
        manifest |= {"images_file": images_file, "images_sha256": images_sha256}
    if text is not None:
        manifest |= _write_shard_text(root, shard, text, num_samples, len(image_paths))
    manifest |= {"labels": labels, "images": image_paths, "skipped": [list(entry) for entry in skipped]}
    write_json(root / shard_manifest_file(shard), manifest)


def _write_shard_text(root: Path, shard: int, text: ShardText, num_samples: int, num_images: int) -> dict:
    if len(text.captions) != num_images or len(text.caption_counts) != num_samples:
        raise ValueError(
            f"shard {shard} has {num_images} images and {num_samples} samples, but captions of "
            f"{len(text.captions)} images and caption counts of {len(text.caption_counts)} samples"
        )
    contexts = text.contexts if isinstance(text.contexts, RowStream) else _as_blocks(text.contexts)
    contexts_file = shard_contexts_file(shard)
    num_contexts, contexts_sha256 = _write_npy_atomic(root / contexts_file, contexts)
    if num_contexts != sum(len(captions) for captions in text.captions):
        raise ValueError(f"shard {shard} has {num_contexts} contexts for {sum(map(len, text.captions))} captions")
    return {
        "contexts_file": contexts_file,
        "contexts_sha256": contexts_sha256,
        "num_contexts": num_contexts,
        "caption_counts": list(text.caption_counts),
        "captions": [list(captions) for captions in text.captions],
    }


def _as_blocks(array: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    return [array] if isinstance(array, np.ndarray) else array


def is_shard_done(root: Path, shard: int) -> bool:
    return (root / shard_manifest_file(shard)).is_file() and (root / shard_data_file(shard)).is_file()


def remove_temp_files(root: Path) -> None:
    """Leftovers of interrupted writes; call only when no process is writing."""
    for path in root.glob(f".*{_TEMP_MARK}*"):
        path.unlink()


def _caption_rows(manifests: list[dict]) -> np.ndarray:
    """(num_samples, 2) int64 [first global context row, number of captions] of every sample, from the
    manifests: an image's captions follow those of the images before it, its samples share them."""
    rows, offset = [], 0
    for manifest in manifests:
        counts = np.array([len(captions) for captions in manifest["captions"]], dtype=np.int64)
        starts = offset + np.cumsum(counts) - counts
        copies = manifest["num_samples"] // max(len(counts), 1)  # 2 with --flip
        shard_rows = np.stack([np.repeat(starts, copies), np.repeat(counts, copies)], axis=1).reshape(-1, 2)
        if len(shard_rows) != manifest["num_samples"] or shard_rows[:, 1].tolist() != manifest["caption_counts"]:
            raise RuntimeError(f"the manifest of shard {manifest['shard']} disagrees with itself about its captions")
        rows.append(shard_rows)
        offset += manifest["num_contexts"]
    return np.concatenate(rows)


def _finalize_text(root: Path, manifests: list[dict], description: dict, null_context: np.ndarray | None) -> dict:
    """Write caption_rows.npy and null_context.npy; the index keys they add."""
    if null_context is None:
        raise ValueError("text data needs the null context (the encoded empty caption) to finalize")
    shape, dtype = tuple(description["context_shape"]), np.dtype(description["context_dtype"])
    if null_context.shape != shape or null_context.dtype != dtype:
        raise ValueError(f"the null context is {null_context.dtype} {null_context.shape}, the data {dtype} {shape}")
    caption_rows = _npy_bytes(_caption_rows(manifests))
    _write_atomic(root / CAPTION_ROWS_FILE, caption_rows)
    null_data = _npy_bytes(null_context)
    _write_atomic(root / NULL_CONTEXT_FILE, null_data)
    return {
        "num_captions": sum(manifest["num_contexts"] for manifest in manifests),
        "caption_rows_file": CAPTION_ROWS_FILE,
        "caption_rows_sha256": hashlib.sha256(caption_rows).hexdigest(),
        "null_context_file": NULL_CONTEXT_FILE,
        "null_context_sha256": hashlib.sha256(null_data).hexdigest(),
    }


_SHARD_EXTRA_KEYS = ("images_file", "images_sha256", "contexts_file", "contexts_sha256", "num_contexts")


def finalize(root: Path, num_shards: int, description: dict, null_context: np.ndarray | None = None) -> dict:
    """Gather the shard manifests into labels.npy, skipped.txt and index.json; return the index. Text data
    (description["condition"] "text") also gets caption_rows.npy and null_context.npy, which holds
    `null_context`, the (L, D) float16 encoded empty caption."""
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
        | {key: m[key] for key in _SHARD_EXTRA_KEYS if key in m}
        for m in manifests
    ]
    image_sha256s = [shard["images_sha256"] for shard in shards if "images_sha256" in shard]
    labels_sha256 = hashlib.sha256(labels_data).hexdigest()
    text, text_sha256s = {}, []
    if description.get("condition") == "text":
        text = _finalize_text(root, manifests, description, null_context)
        text_sha256s = [shard["contexts_sha256"] for shard in shards]
        text_sha256s += [text["caption_rows_sha256"], text["null_context_sha256"]]
    checksum = combined_checksum([shard["sha256"] for shard in shards], labels_sha256, image_sha256s, text_sha256s)
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **description,
        "num_samples": len(labels),
        "num_images": sum(len(manifest["images"]) for manifest in manifests),
        "num_skipped": len(skipped),
        "labels_file": LABELS_FILE,
        "labels_sha256": labels_sha256,
        **text,
        "shards": shards,
        "checksum": checksum,
    }
    write_json(root / INDEX_FILE, index)
    remove_temp_files(root)
    return index
