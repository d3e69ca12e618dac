"""Image inputs of the evaluator: `.npz` batches (read in chunks, never whole) and image folders.

Both yield uint8 (B, H, W, 3) numpy batches. Every check runs when a source is opened, before any
network work: the key, dtype and shape of `arr_0`, the statistics keys, and folder image sizes; an image
whose data turns out corrupt while it is decoded, or an `.npz` whose `arr_0` data fail the archive's
CRC-32 once read, stops the run with a UserError naming the file as well. A folder of
differently sized images (COCO's val2014) is read with a crop size: each image is ADM-center-cropped to
N x N as it is decoded, the crop the training data gets (`preprocessing.image.center_crop_adm`).
"""

import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from errors import UserError
from preprocessing.image import center_crop_adm, load_rgb

from .inception import POOL_DIM, SPATIAL_DIM
from .metrics import FIDStatistics

IMAGES_KEY = "arr_0"  # ADM / DiT sample and reference batches
STATISTICS_SHAPES = {  # ADM reference batch keys
    "mu": (POOL_DIM,),
    "sigma": (POOL_DIM, POOL_DIM),
    "mu_s": (SPATIAL_DIM,),
    "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
}
IMAGE_SIZE_KEY = "image_size"  # (height, width) of the images, written with the statistics by this suite
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
SAVE_STATISTICS_COMMAND = "`python -m evaluations.evaluator REF --save-ref-stats OUT.npz`"


@dataclass
class ReferenceStatistics:
    """FID statistics of pool_3 features and sFID statistics of mixed_6/conv features."""

    pool: FIDStatistics
    spatial: FIDStatistics
    image_size: tuple[int, int] | None = None  # (height, width) of the images; None when not recorded


def format_size(size):
    height, width = size
    return f"{height}x{width}"


def check_npz_file(path, expected):
    """Raise unless `path` is an existing zip archive, as np.savez writes; `expected` words the hint."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected {expected}")
    if path.suffix != ".npz" or not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not an .npz (zip) archive; expected {expected}")


def read_npy_header(file, where):
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(file)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(file)
    except ValueError as error:  # numpy's words for a member that is not a .npy array
        raise UserError(f"{where}: not a readable .npy array ({error})") from error
    raise UserError(f"{where}: unsupported .npy format version {version}")


def check_image_array(shape, dtype, where):
    if dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8 in [0, 255], got dtype {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"{where}: images must have shape (N, H, W, 3) (NHWC RGB), got {tuple(shape)}")


class NpzImages:
    """`arr_0` of an `.npz` file, streamed from the archive a batch at a time."""

    def __init__(self, path):
        self.path = Path(path)
        self.where = f"{self.path}[{IMAGES_KEY}]"
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = [name.removesuffix(".npy") for name in archive.namelist()]
                if IMAGES_KEY not in names:
                    hint = "; it holds statistics only, the images are needed here" if "mu" in names else ""
                    raise UserError(f"{self.path}: no `{IMAGES_KEY}` image array (keys: {names}){hint}")
                with archive.open(f"{IMAGES_KEY}.npy") as file:
                    shape, fortran_order, dtype = read_npy_header(file, self.where)
        except zipfile.BadZipFile as error:  # a zip signature, but a damaged archive
            raise UserError(f"{self.path}: damaged .npz archive ({error})") from error
        check_image_array(shape, dtype, self.where)
        if fortran_order:
            raise UserError(f"{self.where}: Fortran-ordered arrays are not supported; save it C-ordered")
        self.num_images = shape[0]
        self.image_shape = tuple(shape[1:])

    def batches(self, batch_size, num_images):
        """The first `num_images` images, `batch_size` at a time. Damaged image data (the archive's CRC-32
        of `arr_0`, checked once the whole member has been read, or its compressed stream) stop the run
        with a UserError naming the file: found while reading, as a full extra pass over tens of GB up
        front would cost as much as the reading itself."""
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(f"{IMAGES_KEY}.npy") as file:
                read_npy_header(file, self.where)
                for start in range(0, num_images, batch_size):
                    batch = np.empty((min(batch_size, num_images - start), *self.image_shape), dtype=np.uint8)
                    if file.readinto(memoryview(batch).cast("B")) != batch.nbytes:
                        raise UserError(f"{self.where}: the file ends before image {start + len(batch)}")
                    yield batch
        except (zipfile.BadZipFile, zlib.error) as error:  # a CRC mismatch or a broken deflate stream
            raise UserError(f"{self.path}: damaged .npz archive: its `{IMAGES_KEY}` image data are corrupt "
                            f"({error})") from error


def read_rgb(file):
    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    except OSError as error:  # PIL's error for truncated or damaged image data
        raise UserError(f"{file}: corrupt image ({error})") from error


def read_center_cropped(file, crop_size):
    """(crop_size, crop_size, 3) uint8: the whole file decoded to RGB, then ADM-center-cropped."""
    try:
        return center_crop_adm(load_rgb(file), crop_size)
    except OSError as error:  # PIL's error for truncated or damaged image data
        raise UserError(f"{file}: corrupt image ({error})") from error


def header_image_size(file):
    """(width, height) from the image header; the pixels are decoded later, batch by batch."""
    try:
        with Image.open(file) as image:
            return image.size
    except OSError as error:  # PIL.UnidentifiedImageError and unreadable files
        raise UserError(f"{file}: not a readable image ({error})") from error


class FolderImages:
    """Every image file directly in a folder, sorted by name, decoded to RGB. Without `crop_size` all must
    share one size; with it, each is ADM-center-cropped to `crop_size` x `crop_size`, whatever its size."""

    def __init__(self, path, crop_size=None):
        self.path = Path(path)
        self.crop_size = crop_size
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UserError(f"{self.path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        sizes = {}
        for file in self.files:  # every header is read, so an unreadable file is found now
            sizes.setdefault(header_image_size(file), file)
        self.num_images = len(self.files)
        if crop_size is not None:
            self.image_shape = (crop_size, crop_size, 3)
            return
        if len(sizes) > 1:
            examples = ", ".join(f"{file.name} is {h}x{w}" for (w, h), file in list(sizes.items())[:3])
            raise UserError(
                f"{self.path}: images differ in size (height x width: {examples}); center-crop them to one size "
                "first, or pass --center-crop N to have each ADM-center-cropped to N x N as it is read"
            )
        ((width, height),) = sizes
        self.image_shape = (height, width, 3)

    def read(self, file):
        """One image as (H, W, 3) uint8, center-cropped where the folder was opened with a crop size."""
        return read_rgb(file) if self.crop_size is None else read_center_cropped(file, self.crop_size)

    def batches(self, batch_size, num_images):
        for start in range(0, num_images, batch_size):
            files = self.files[start : min(start + batch_size, num_images)]
            yield np.stack([self.read(file) for file in files])


def open_images(path, crop_size=None):
    """An image source for an `.npz` file or a folder, validated.

    `crop_size` N (the evaluator's --center-crop): a folder's images are ADM-center-cropped to N x N as
    they are read; an `.npz` is accepted only if its images are N x N already, as it is never cropped.
    """
    path = Path(path)
    if crop_size is not None and crop_size < 1:
        raise ValueError(f"crop size {crop_size}: at least 1 is needed")
    if path.is_dir():
        return FolderImages(path, crop_size)
    check_npz_file(path, "an .npz archive or a folder of images")
    images = NpzImages(path)
    if crop_size is not None and images.image_shape[:2] != (crop_size, crop_size):
        raise UserError(
            f"{path}: --center-crop {crop_size} crops the images of folders only, and this .npz holds "
            f"{format_size(images.image_shape[:2])} images; save them cropped to {crop_size}x{crop_size}, "
            "or leave --center-crop out"
        )
    return images


def read_array(npz, key, path):
    try:
        return npz[key]
    except (ValueError, zipfile.BadZipFile) as error:  # object arrays (pickles) or a damaged member
        raise UserError(f"{path}[{key}]: not a readable array ({error})") from error


def read_stored_image_size(npz, path):
    """The (height, width) stored under `image_size`, or None where the file has none (ADM's batches)."""
    if IMAGE_SIZE_KEY not in npz.files:
        return None
    size = read_array(npz, IMAGE_SIZE_KEY, path)
    if size.shape != (2,) or not np.issubdtype(size.dtype, np.integer) or (size < 1).any():
        raise UserError(
            f"{path}[{IMAGE_SIZE_KEY}]: expected two positive integers (height, width), "
            f"got {size.dtype} of shape {size.shape}: {size.ravel()[:4].tolist()}"
        )
    return int(size[0]), int(size[1])


def read_statistics(path):
    """The `mu, sigma, mu_s, sigma_s` (and `image_size`, if stored) of an `.npz` (ADM reference batch or
    saved statistics), or None where it has no statistics."""
    try:
        npz = np.load(path)
    except zipfile.BadZipFile as error:  # a zip signature, but a damaged archive
        raise UserError(f"{path}: damaged .npz archive ({error})") from error
    with npz:
        present = [key for key in STATISTICS_SHAPES if key in npz.files]
        if not present:
            return None
        missing = [key for key in STATISTICS_SHAPES if key not in npz.files]
        if missing:
            raise UserError(f"{path}: has {present} but lacks {missing}")
        arrays = {}
        for key, shape in STATISTICS_SHAPES.items():
            array = read_array(npz, key, path)
            if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
                raise UserError(
                    f"{path}[{key}]: expected a float array of shape {shape}, got {array.dtype} {array.shape}"
                )
            if not np.isfinite(array).all():
                raise UserError(f"{path}[{key}]: has non-finite values")
            arrays[key] = array
        image_size = read_stored_image_size(npz, path)
    return ReferenceStatistics(
        FIDStatistics(arrays["mu"], arrays["sigma"]),
        FIDStatistics(arrays["mu_s"], arrays["sigma_s"]),
        image_size,
    )


def load_reference_statistics(path):
    """FID/sFID statistics saved in an `.npz` (for in-training FID); raises if it has none.

    `image_size` of the result is the (height, width) the statistics were computed at, where the file
    records it (files written by --save-ref-stats do), else None.
    """
    path = Path(path)
    check_npz_file(path, f"reference statistics written by {SAVE_STATISTICS_COMMAND}")
    statistics = read_statistics(path)
    if statistics is None:
        raise UserError(f"{path}: no `mu, sigma, mu_s, sigma_s`; compute them with {SAVE_STATISTICS_COMMAND}")
    return statistics


def statistics_sha256(statistics: ReferenceStatistics) -> str:
    """A reference's identity by content: sha256 over what an FID against it uses (mu, sigma, mu_s, sigma_s:
    dtype, shape and bytes), so an ADM reference batch is known without reading the images it also holds."""
    digest = hashlib.sha256()
    for name, array in (("mu", statistics.pool.mu), ("sigma", statistics.pool.sigma),
                        ("mu_s", statistics.spatial.mu), ("sigma_s", statistics.spatial.sigma)):
        array = np.ascontiguousarray(array)
        digest.update(f"{name}:{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_statistics(path, statistics):
    """Write statistics with the ADM reference batch keys and dtypes (mu float32, sigma float64), and
    `image_size` (height, width) when it is known."""
    image_size = {} if statistics.image_size is None else {IMAGE_SIZE_KEY: np.array(statistics.image_size)}
    np.savez(
        path,
        mu=statistics.pool.mu,
        sigma=statistics.pool.sigma,
        mu_s=statistics.spatial.mu,
        sigma_s=statistics.spatial.sigma,
        **image_size,
    )
