"""Image inputs of the evaluator: `.npz` batches (read in chunks, never whole) and image folders.

Both yield uint8 (B, H, W, 3) numpy batches. Every check runs when a source is opened, before any
network work: the key, dtype and shape of `arr_0`, the statistics keys, and folder image sizes.
"""

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .inception import POOL_DIM, SPATIAL_DIM
from .metrics import FIDStatistics

IMAGES_KEY = "arr_0"  # ADM / DiT sample and reference batches
STATISTICS_SHAPES = {  # ADM reference batch keys
    "mu": (POOL_DIM,),
    "sigma": (POOL_DIM, POOL_DIM),
    "mu_s": (SPATIAL_DIM,),
    "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class ReferenceStatistics:
    """FID statistics of pool_3 features and sFID statistics of mixed_6/conv features."""

    pool: FIDStatistics
    spatial: FIDStatistics


def read_npy_header(file, where):
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(file)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(file)
    raise ValueError(f"{where}: unsupported .npy format version {version}")


def check_image_array(shape, dtype, where):
    if dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 in [0, 255], got dtype {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{where}: images must have shape (N, H, W, 3) (NHWC RGB), got {tuple(shape)}")


class NpzImages:
    """`arr_0` of an `.npz` file, streamed from the archive a batch at a time."""

    def __init__(self, path):
        self.path = Path(path)
        self.where = f"{self.path}[{IMAGES_KEY}]"
        with zipfile.ZipFile(self.path) as archive:
            names = [name.removesuffix(".npy") for name in archive.namelist()]
            if IMAGES_KEY not in names:
                hint = "; it holds statistics only, the images are needed here" if "mu" in names else ""
                raise ValueError(f"{self.path}: no `{IMAGES_KEY}` image array (keys: {names}){hint}")
            with archive.open(f"{IMAGES_KEY}.npy") as file:
                shape, fortran_order, dtype = read_npy_header(file, self.where)
        check_image_array(shape, dtype, self.where)
        if fortran_order:
            raise ValueError(f"{self.where}: Fortran-ordered arrays are not supported; save it C-ordered")
        self.num_images = shape[0]
        self.image_shape = tuple(shape[1:])

    def batches(self, batch_size, num_images):
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{IMAGES_KEY}.npy") as file:
            read_npy_header(file, self.where)
            for start in range(0, num_images, batch_size):
                batch = np.empty((min(batch_size, num_images - start), *self.image_shape), dtype=np.uint8)
                if file.readinto(memoryview(batch).cast("B")) != batch.nbytes:
                    raise ValueError(f"{self.where}: the file ends before image {start + len(batch)}")
                yield batch


def read_rgb(file):
    with Image.open(file) as image:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


class FolderImages:
    """Every image file directly in a folder, sorted by name, decoded to RGB; all must share one size."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"{self.path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        sizes = {}
        for file in self.files:
            with Image.open(file) as image:
                sizes.setdefault(image.size, file)
        if len(sizes) > 1:
            examples = ", ".join(f"{file.name} is {w}x{h}" for (w, h), file in list(sizes.items())[:3])
            raise ValueError(
                f"{self.path}: images differ in size ({examples}); center-crop them to one size first"
            )
        ((width, height),) = sizes
        self.num_images = len(self.files)
        self.image_shape = (height, width, 3)

    def batches(self, batch_size, num_images):
        for start in range(0, num_images, batch_size):
            files = self.files[start : min(start + batch_size, num_images)]
            yield np.stack([read_rgb(file) for file in files])


def open_images(path):
    """An image source for an `.npz` file or a folder, validated."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix != ".npz" or not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: expected an .npz archive or a folder of images")
    return NpzImages(path)


def read_statistics(path):
    """The `mu, sigma, mu_s, sigma_s` of an `.npz` (ADM reference batch or saved statistics), or None."""
    with np.load(path) as npz:
        present = [key for key in STATISTICS_SHAPES if key in npz.files]
        if not present:
            return None
        missing = [key for key in STATISTICS_SHAPES if key not in npz.files]
        if missing:
            raise ValueError(f"{path}: has {present} but lacks {missing}")
        arrays = {}
        for key, shape in STATISTICS_SHAPES.items():
            array = npz[key]
            if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
                raise ValueError(
                    f"{path}[{key}]: expected a float array of shape {shape}, got {array.dtype} {array.shape}"
                )
            if not np.isfinite(array).all():
                raise ValueError(f"{path}[{key}]: has non-finite values")
            arrays[key] = array
    return ReferenceStatistics(
        FIDStatistics(arrays["mu"], arrays["sigma"]), FIDStatistics(arrays["mu_s"], arrays["sigma_s"])
    )


def load_reference_statistics(path):
    """FID/sFID statistics saved in an `.npz` (for in-training FID); raises if it has none."""
    statistics = read_statistics(path)
    if statistics is None:
        raise ValueError(
            f"{path}: no `mu, sigma, mu_s, sigma_s`; compute them with "
            f"`python -m evaluations.evaluator REF --save-ref-stats OUT.npz`"
        )
    return statistics


def save_statistics(path, statistics):
    """Write statistics with the ADM reference batch keys and dtypes (mu float32, sigma float64)."""
    np.savez(
        path,
        mu=statistics.pool.mu,
        sigma=statistics.pool.sigma,
        mu_s=statistics.spatial.mu,
        sigma_s=statistics.spatial.sigma,
    )
