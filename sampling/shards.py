"""Resumable sampling: finished batches live as shard files in a work folder; the final `.npz` is
assembled from them in index order.

Every file appears atomically and durably (written under a temporary name, fsynced, renamed, and the
rename fsynced), so after a kill the work folder holds only whole shards, and a rerun produces just the
missing indices. A shard damaged anyway (a disk fault, a copy cut short, a hand edit) is found when the
folder is scanned at start, reported, moved aside and resampled. The final file is streamed shard by
shard into the zip, so assembling 50K images never holds them all in memory.
"""
import contextlib
import json
import os
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np

from errors import UserError

SETTINGS_FILE = "settings.json"  # everything that decides the images; a rerun must match it
# Recorded for the reader, never compared: the checkpoint's path. Its weights are compared by content
# (ckpt_sha256), so the same weights moved elsewhere still match and other weights under the old path do not.
INFORMATION_KEYS = ("ckpt",)
SHARD_NAME = re.compile(r"(\d+)-(\d+)\.npz")  # images of the indices [start, end)
TEMP_SUFFIX = ".tmp"
DAMAGED_SUFFIX = ".damaged"  # a shard that failed the scan, kept aside (not a shard name) until the folder goes
# What reading a damaged zip or npy member can raise: a bad or cut zip, a bad CRC, a malformed header.
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
READ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError)
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same samples give the same file bytes


def _temp_path(path: Path) -> Path:
    # One name per process: two processes never write the same temporary file.
    return path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def temp_files(path) -> list[Path]:
    """The temporary files of `path` that writers (killed ones included) left: `{name}.{pid}.tmp`."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.\d+" + re.escape(TEMP_SUFFIX))
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable, where the OS lets a directory be opened and fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename stands regardless
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """`write(file)` to a temporary file, fsync it, rename it to `path` and fsync the directory: `path` is
    either absent or whole, even after a crash of the machine. The temporary file never outlives a failure."""
    temp = _temp_path(path)
    try:
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def npy_header(shape, dtype) -> dict:
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    return {"descr": descr, "fortran_order": False, "shape": tuple(shape)}


def check_settings(path, settings: dict) -> None:
    """Error naming the differences if the settings file at `path` exists and differs from `settings`
    (INFORMATION_KEYS aside)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a readable settings record ({error}); delete it with the samples "
                        "beside it to start afresh") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a settings record (a JSON object); delete it with the samples beside "
                        "it to start afresh")
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    changed = sorted(key for key in set(saved) | set(settings)
                     if key not in INFORMATION_KEYS and saved.get(key) != settings.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {settings.get(key)!r}" for key in changed)
        raise UserError(
            f"{path} records samples made with other settings ({details}); rerun with the original "
            "flags, or pass another --output (or delete the old files) to start afresh"
        )


def write_settings(path, settings: dict) -> None:
    _write_atomic(Path(path), lambda file: file.write((json.dumps(settings, indent=1) + "\n").encode()))


def set_aside(path: Path) -> Path:
    """Rename a damaged shard out of the shard pattern, so that its indices count as missing; kept until
    the work folder is removed."""
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    os.replace(path, aside)
    return aside


class ShardStore:
    """The work folder of one sampling run: settings.json plus shard files `{start}-{end}.npz`, each
    holding `images` (n, H, W, 3) uint8 and the conditions' record (n,) int64 of the indices [start, end):
    `labels`, or `caption_index` for text-conditioned models (`record_key`)."""

    def __init__(self, work_dir, record_key="labels"):
        self.work_dir = Path(work_dir)
        self.record_key = record_key

    def check_settings(self, settings: dict) -> None:
        """Error if this folder holds shards made with other settings (their images would not fit)."""
        check_settings(self.work_dir / SETTINGS_FILE, settings)

    def prepare(self, settings: dict) -> None:
        """Create the folder, record the settings, drop temporary files a killed run left behind, and
        move aside (with one warning line each) the shards whose structure is wrong (shard_problem), so
        their indices count as missing and are sampled again. Call from one process only, before any
        process lists or writes shards. The scan reads headers only, so that the other processes wait
        seconds, not the time to read every image; flipped bytes inside the data are caught by their
        CRC-32 when the assembly reads them (`_reading`)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for temp in self.work_dir.glob(f"*{TEMP_SUFFIX}"):
            temp.unlink()
        if not (self.work_dir / SETTINGS_FILE).is_file():
            write_settings(self.work_dir / SETTINGS_FILE, settings)
        image_size = settings.get("image_size")
        for start, end, path in self.shards():
            problem = self.shard_problem(path, end - start, image_size)
            if problem is not None:
                aside = set_aside(path)
                print(f"warning: the sample shard {path} is damaged ({problem}); moved aside to {aside.name}, "
                      f"its {end - start} images will be resampled", flush=True)

    def shard_problem(self, path: Path, count: int, image_size=None) -> str | None:
        """What is wrong with the shard at `path` of `count` images (None if nothing): it must be a zip of
        exactly `images` (count, H, W, 3) uint8, H = W = image_size where given, and the record (count,)
        int64, each member as long as its header says. Only the zip directory and the .npy headers are
        read; the data's CRC-32 is checked when the assembly reads it."""
        expected = {"images": ((count, image_size, image_size, 3), np.uint8), self.record_key: ((count,), np.int64)}
        try:
            with zipfile.ZipFile(path) as archive:
                names = sorted(archive.namelist())
                if names != sorted(f"{key}.npy" for key in expected):
                    return f"it holds {', '.join(names) or 'nothing'}, not images.npy and {self.record_key}.npy"
                for key, (shape, dtype) in expected.items():
                    with archive.open(f"{key}.npy") as member:
                        read_header = NPY_HEADER_READERS.get(np.lib.format.read_magic(member))
                        if read_header is None:
                            return f"{key} is not in .npy format 1.0 or 2.0"
                        found_shape, fortran, found_dtype = read_header(member)
                        header_size = member.tell()
                    if (found_dtype != np.dtype(dtype) or fortran or len(found_shape) != len(shape)
                            or any(want is not None and want != got for want, got in zip(shape, found_shape))):
                        return (f"{key} is {found_dtype} {tuple(found_shape)}, expected "
                                f"{np.dtype(dtype)} {tuple('H' if n is None else n for n in shape)}")
                    data_size = int(np.prod(found_shape)) * found_dtype.itemsize
                    if archive.getinfo(f"{key}.npy").file_size != header_size + data_size:
                        return f"{key} has {archive.getinfo(f'{key}.npy').file_size - header_size} data bytes, " \
                               f"expected {data_size}"
        except READ_ERRORS as error:
            return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return None

    def shards(self) -> list[tuple[int, int, Path]]:
        """(start, end, path) of the finished shards, sorted by start."""
        found = []
        for path in self.work_dir.glob("*.npz"):
            match = SHARD_NAME.fullmatch(path.name)
            if match:
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)

    def finished(self, num_samples: int) -> np.ndarray:
        """(num_samples,) bool: which indices some shard already holds."""
        done = np.zeros(num_samples, dtype=bool)
        for start, end, _ in self.shards():
            done[start:min(end, num_samples)] = True
        return done

    def write(self, start: int, images: np.ndarray, records: np.ndarray) -> None:
        end = start + len(images)
        path = self.work_dir / f"{start:07d}-{end:07d}.npz"
        _write_atomic(path, lambda file: np.savez(file, images=images, **{self.record_key: records}))

    def assemble(self, num_samples: int, path, extra_arrays=None) -> None:
        """Write `arr_0` (N, H, W, 3) uint8 and the record (N,) int64 (`labels` or `caption_index`) in index
        order to `path`, atomically, plus the arrays `extra_arrays(record)` derives from the whole record
        (the caption texts). Shards may overlap (a rerun with another batch size); each index is taken once."""
        shards = self.shards()
        if not shards:
            raise ValueError(f"{self.work_dir} holds no samples to assemble")
        with self._reading(shards[0][2]):
            with np.load(shards[0][2]) as first:
                image_shape = first["images"].shape[1:]  # (H, W, 3)
        records = np.empty(num_samples, dtype=np.int64)
        images_header = npy_header((num_samples, *image_shape), np.uint8)

        def write(file):
            with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                images_entry = zipfile.ZipInfo("arr_0.npy", ZIP_TIMESTAMP)
                with archive.open(images_entry, "w", force_zip64=True) as entry:
                    np.lib.format.write_array_header_1_0(entry, images_header)
                    self._stream_images(shards, num_samples, entry, records)
                arrays = {self.record_key: records, **(extra_arrays(records) if extra_arrays else {})}
                for name, array in arrays.items():
                    with archive.open(zipfile.ZipInfo(f"{name}.npy", ZIP_TIMESTAMP), "w") as entry:
                        np.lib.format.write_array_header_1_0(entry, npy_header(array.shape, array.dtype))
                        entry.write(np.ascontiguousarray(array).tobytes())

        _write_atomic(Path(path), write)

    def _stream_images(self, shards, num_samples: int, entry, records: np.ndarray) -> None:
        """Write the images of indices 0..N-1 to `entry` in order and fill `records`, the per-index record."""
        next_index = 0
        for start, end, shard_path in shards:
            if start > next_index:
                break
            if end <= next_index:
                continue
            offset, count = next_index - start, min(end, num_samples) - next_index
            with self._reading(shard_path), np.load(shard_path) as shard:
                images = shard["images"][offset:offset + count]  # (count, H, W, 3)
                shard_records = shard[self.record_key][offset:offset + count]
            entry.write(np.ascontiguousarray(images).tobytes())
            records[next_index:next_index + count] = shard_records
            next_index += count
        if next_index != num_samples:
            raise ValueError(f"{self.work_dir} lacks the samples from index {next_index} on")

    @contextlib.contextmanager
    def _reading(self, shard_path: Path):
        """A shard that fails while the assembly reads it (a bad CRC-32, or damage after the scan at start)
        is moved aside and fails the assembly with a UserError naming it; the rerun resamples its images."""
        try:
            yield
        except READ_ERRORS as error:
            aside = set_aside(shard_path)
            raise UserError(f"the sample shard {shard_path} could not be read ({type(error).__name__}: {error}); it "
                            f"is moved aside to {aside.name}: rerun the same command to resample its images") from None

    def remove(self) -> None:
        shutil.rmtree(self.work_dir)


def plan_batches(finished: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """The missing indices as contiguous [start, end) ranges of at most batch_size, in index order."""
    if batch_size < 1:
        raise UserError(f"the batch size must be >= 1, got {batch_size}")
    missing = np.flatnonzero(~finished)
    batches = []
    # Split where consecutive missing indices are not adjacent: each run is contiguous.
    for run in np.split(missing, np.flatnonzero(np.diff(missing) != 1) + 1):
        for offset in range(0, len(run), batch_size):
            chunk = run[offset:offset + batch_size]
            batches.append((int(chunk[0]), int(chunk[-1]) + 1))
    return batches
