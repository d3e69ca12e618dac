"""Image folder -> preprocessed dataset: validation, the per-process encoding loop, the final index.

Work is cut into shards of a fixed number of source images. A shard is written atomically once all its
images are encoded, so a rerun after an interruption redoes only unfinished shards: no image is lost
or stored twice. With several processes, the unfinished shards are dealt round-robin across ranks.
"""

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError
from preprocessing import store
from preprocessing.folder import ImageFolder, scan_image_folder
from preprocessing.image import center_crop_adm, load_rgb
from preprocessing.vae import Vae, encode_moments, load_vae, vae_id

log = logging.getLogger("preprocessing")

# 4096 images: ImageNet makes ~310 shards, well below the usual limit of 1024 open files (every reading
# process memory-maps every shard, and its image file with --keep-images); a shard of SD moments at 256 px
# with --flip is 134 MB, held in memory until written (its clean images: 1.6 GB more, 6.4 GB at 512 px);
# an interruption loses at most one shard of work per process (~15 s of an H200).
DEFAULT_IMAGES_PER_SHARD = 4096
PIXELS_DTYPE = np.uint8  # exact and 4x smaller than float32; normalized to [-1, 1] when read
PIXEL_SPACE = "none"  # --vae none: store pixels, train in pixel space
MOMENTS_DTYPE = np.float16  # the choice: posterior mean and std in half precision


def run_settings(
    folder: ImageFolder, resolution: int, vae: str, flip: bool, images_per_shard: int, keep_images: bool
) -> dict:
    """What fixes the output; a rerun into the same folder must match it exactly."""
    return {
        "format_version": store.FORMAT_VERSION,
        "input_fingerprint": folder.fingerprint(),
        "num_input_images": len(folder.records),
        "resolution": resolution,
        "vae": vae,
        "flip": flip,
        "images_per_shard": images_per_shard,
        "keep_images": keep_images,
    }


# The value of a setting that a run.json written before the setting existed stands for.
SETTINGS_ADDED_LATER = {"keep_images": False}


@dataclass(frozen=True)
class Run:
    folder: ImageFolder
    output: Path
    resolution: int
    vae: Vae | None  # None: pixel space (--vae none)
    flip: bool
    images_per_shard: int
    keep_images: bool  # write image files; never with pixel space, whose samples are the images

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.folder.records) / self.images_per_shard)

    def shard_image_range(self, shard: int) -> range:
        start = shard * self.images_per_shard
        return range(start, min(start + self.images_per_shard, len(self.folder.records)))

    def settings(self) -> dict:
        return run_settings(
            self.folder,
            self.resolution,
            self.vae.name if self.vae else PIXEL_SPACE,
            self.flip,
            self.images_per_shard,
            self.keep_images,
        )

    def stored_shape(self) -> tuple[int, int, int]:
        if self.vae is None:
            return (3, self.resolution, self.resolution)
        side = self.resolution // self.vae.downsample
        return (2 * self.vae.latent_channels, side, side)

    def _images_description(self) -> dict:
        if self.vae is None:
            where = "the stored samples themselves (pixel data keeps no second copy)"
        elif self.keep_images:
            where = "in images-XXXXX.npy beside each shard (shards[k].images_file), row k for sample k"
        else:
            return {"has_images": False}
        return {
            "has_images": True,
            "image_shape": [3, self.resolution, self.resolution],
            "image_dtype": np.dtype(store.IMAGES_DTYPE).name,
            "image_layout": "RGB uint8 (3, R, R), the ADM center crop each sample was made from (its mirror "
            f"for a mirrored sample): {where}",
        }

    def description(self) -> dict:
        """The metadata of the finished dataset that does not depend on which images were readable."""
        channels, height, width = self.stored_shape()
        common = {
            "resolution": self.resolution,
            "crop": "ADM center crop (guided-diffusion center_crop_arr)",
            "flip": self.flip,
            "num_classes": len(self.folder.class_names),
            "class_names": self.folder.class_names,
            "input": str(self.folder.root.resolve()),
            "stored_shape": [channels, height, width],
            **self._images_description(),
        }
        if self.vae is None:
            return {
                "kind": "pixels",
                "sample_shape": [channels, height, width],
                "stored_dtype": np.dtype(PIXELS_DTYPE).name,
                "stored_layout": "RGB uint8 (C, H, W); the dataset returns pixels / 127.5 - 1",
                "vae": None,
                "scale": None,
                "shift": None,
                **common,
            }
        scaling = self.vae.scaling
        return {
            "kind": "vae",
            "sample_shape": [channels // 2, height, width],
            "stored_dtype": np.dtype(MOMENTS_DTYPE).name,
            "stored_layout": "posterior mean (C) then std (C) along dim 0; model input (mean + std * noise"
            " - shift) * scale",
            "vae": self.vae.name,
            "vae_downsample": self.vae.downsample,
            "vae_latent_channels": self.vae.latent_channels,
            "scale": scaling.scale,
            "shift": scaling.shift,
            "scale_source": scaling.source,
            **common,
        }


def _check_output(output: Path, settings: dict) -> None:
    # The folder nearest to --output that exists: where the run will create or write its files.
    nearest = next(path for path in [output, *output.absolute().parents] if path.exists())
    if nearest == output and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if not nearest.is_dir():
        raise UserError(f"--output {output} cannot be created: {nearest} is not a directory")
    finished = (output / store.INDEX_FILE).is_file()  # a rerun of a finished run writes nothing
    if not finished and not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"--output {output}: no permission to write in {nearest}")
    run_file = output / store.RUN_FILE
    if run_file.is_file():
        previous = store.read_json(run_file)
        then = {key: previous.get(key, SETTINGS_ADDED_LATER.get(key)) for key in settings}
        changed = [f"{key}: {then[key]!r} then, {now!r} now" for key, now in settings.items() if then[key] != now]
        if changed:
            raise UserError(
                f"--output {output} holds a run with other settings ({'; '.join(changed)}); "
                "rerun with the same arguments and input to resume, or choose a new --output"
            )
    elif output.is_dir() and any(output.iterdir()):
        raise UserError(f"--output {output} is not empty and holds no {store.RUN_FILE}; choose a new folder")


def prepare_run(
    input_dir: str | Path,
    output: str | Path,
    resolution: int,
    vae_name: str,
    flip: bool,
    images_per_shard: int,
    device: torch.device,
    keep_images: bool = False,
) -> Run:
    """Every check that can fail, cheapest first; raises UserError before anything is written."""
    if resolution <= 0:
        raise UserError(f"--resolution must be positive, got {resolution}")
    if images_per_shard <= 0:
        raise UserError(f"--images-per-shard must be positive, got {images_per_shard}")
    folder = scan_image_folder(input_dir)
    output = Path(output)
    pixel_space = vae_name == PIXEL_SPACE
    keep_images = keep_images and not pixel_space  # pixel samples are the images already
    vae_name = PIXEL_SPACE if pixel_space else vae_id(vae_name)
    _check_output(output, run_settings(folder, resolution, vae_name, flip, images_per_shard, keep_images))
    vae = None if pixel_space else load_vae(vae_name, device)
    if vae is not None and resolution % vae.downsample:
        raise UserError(
            f"--resolution {resolution} is not divisible by {vae.downsample}, the downsampling "
            f"factor of the VAE {vae.name} (2 ** (len(block_out_channels) - 1))"
        )
    return Run(folder, output, resolution, vae, flip, images_per_shard, keep_images)


def start_run(run: Run) -> None:
    """Main process only, before any shard is written."""
    run.output.mkdir(parents=True, exist_ok=True)
    if not (run.output / store.RUN_FILE).is_file():
        store.write_json(run.output / store.RUN_FILE, run.settings())


def pending_shards(run: Run) -> list[int]:
    return [shard for shard in range(run.num_shards) if not store.is_shard_done(run.output, shard)]


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and crops in loader workers; a bad file yields its error message instead of pixels."""

    def __init__(self, run: Run):
        self.root = run.folder.root
        self.records = run.folder.records
        self.resolution = run.resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            pixels = center_crop_adm(load_rgb(self.root / self.records[i].path), self.resolution)
        # Any failure to decode is a bad input file (PIL raises OSError, SyntaxError, ValueError, ...).
        except Exception as error:
            return i, None, f"{type(error).__name__}: {error}"
        return i, torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1), None  # (3, R, R)


def _as_list(items: list) -> list:
    return items


def _shard_batches(run: Run, shards: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """(shard, image indices) per batch; batches never cross shards, so a shard is written as it ends."""
    batches = []
    for shard in shards:
        images = list(run.shard_image_range(shard))
        batches += [
            (shard, images[start : start + batch_size]) for start in range(0, len(images), batch_size)
        ]
    return batches


def _encode(run: Run, pixels: torch.Tensor) -> torch.Tensor:
    return pixels if run.vae is None else encode_moments(run.vae, pixels)


def _encode_batch(run: Run, pixels: torch.Tensor, device: torch.device) -> np.ndarray:
    """(N, 3, R, R) uint8 -> stored samples, with --flip each image followed by its mirror image."""
    pixels = pixels.to(device)
    samples = _encode(run, pixels)
    if run.flip:
        # The mirror image is encoded in a second pass, so that --flip does not double the VAE's memory.
        samples = torch.stack([samples, _encode(run, pixels.flip(-1))], dim=1).flatten(0, 1)  # (2N, ...)
    return samples.cpu().numpy()


def _clean_images(run: Run, pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, R, R) uint8 -> the image of every sample `_encode_batch` makes of it, row for row."""
    if run.flip:
        pixels = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)  # (2N, 3, R, R)
    return pixels.numpy()


class _ShardBuffer:
    def __init__(self, run: Run):
        self.run = run
        self.samples, self.clean_images, self.labels, self.images, self.skipped = [], [], [], [], []

    def add(self, samples: np.ndarray, clean_images: np.ndarray | None, image_indices: list[int]) -> None:
        copies = 2 if self.run.flip else 1
        records = [self.run.folder.records[i] for i in image_indices]
        self.samples.append(samples)
        if clean_images is not None:
            self.clean_images.append(clean_images)
        self.labels += [record.label for record in records for _ in range(copies)]
        self.images += [record.path for record in records]

    def skip(self, image_index: int, reason: str) -> None:
        self.skipped.append((self.run.folder.records[image_index].path, reason))

    def write(self, shard: int) -> None:
        # Written block by block: joined, a shard of clean images would take its size again in memory.
        dtype = PIXELS_DTYPE if self.run.vae is None else MOMENTS_DTYPE
        samples = [np.empty((0, *self.run.stored_shape()), dtype), *self.samples]  # typed even when empty
        clean_images = None
        if self.run.keep_images:
            image_shape = (3, self.run.resolution, self.run.resolution)
            clean_images = [np.empty((0, *image_shape), store.IMAGES_DTYPE), *self.clean_images]
        store.write_shard(
            self.run.output, shard, samples, self.labels, self.images, self.skipped, clean_images=clean_images
        )


def encode_shards(
    run: Run, shards: list[int], *, batch_size: int, num_workers: int, device: torch.device, progress: bool
) -> None:
    """Encode and write the given shards; unreadable images are logged and left out."""
    batches = _shard_batches(run, shards, batch_size)
    loader = torch.utils.data.DataLoader(
        _ImageFiles(run),
        batch_sampler=[images for _, images in batches],
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    bar = tqdm(total=sum(len(images) for _, images in batches), unit="img", disable=not progress)
    buffer = _ShardBuffer(run)
    for position, items in enumerate(loader):
        shard = batches[position][0]
        for i, _, error in items:
            if error is not None:
                log.warning("skipped %s: %s", run.folder.root / run.folder.records[i].path, error)
                buffer.skip(i, error)
        readable = [(i, pixels) for i, pixels, _ in items if pixels is not None]
        if readable:
            pixels = torch.stack([pixels for _, pixels in readable])  # (N, 3, R, R) uint8, on the CPU
            clean_images = _clean_images(run, pixels) if run.keep_images else None
            buffer.add(_encode_batch(run, pixels, device), clean_images, [i for i, _ in readable])
        if position + 1 == len(batches) or batches[position + 1][0] != shard:
            buffer.write(shard)
            buffer = _ShardBuffer(run)
        bar.update(len(items))
    bar.close()


def finalize_run(run: Run) -> dict:
    """Main process only, after every shard is written."""
    return store.finalize(run.output, run.num_shards, run.description())
