"""Image folder -> preprocessed dataset: validation, the per-process encoding loop, the final index.

Work is cut into shards of a fixed number of source images. A shard is written atomically once all its
images are encoded, so a rerun after an interruption redoes only unfinished shards: no image is lost
or stored twice. With several processes, the unfinished shards are dealt round-robin across ranks.

Text-to-image data (--captions) encode each shard's captions with the text encoder as the shard is
written, in batches of --text-batch-size captions, and write the null context when the run finishes.
"""

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError
from preprocessing import store
from preprocessing.captions import captions_sha256
from preprocessing.folder import ImageFolder, captioned_image_folder, scan_image_folder
from preprocessing.image import center_crop_adm, load_rgb
from preprocessing.text import (
    CONTEXT_DTYPE,
    DEFAULT_TEXT_ENCODER,
    TextEncoder,
    load_text_encoder,
    text_encoder_id,
    to_stored,
)
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
# Captions per text encoder forward, per process. CLIP ViT-L/14's text tower in fp32 needs ~2 GiB for 256.
DEFAULT_TEXT_BATCH_SIZE = 256
TEXT_ENCODER_PROTOCOL = (
    "U-ViT FrozenCLIPEmbedder: tokenizer(padding='max_length', max_length, truncation=True), "
    "CLIPTextModel(input_ids).last_hidden_state, fp32, stored as float16"
)


@dataclass(frozen=True)
class CaptionsFile:
    path: Path  # absolute
    sha256: str  # of its bytes


def run_settings(
    folder: ImageFolder,
    resolution: int,
    vae: str,
    flip: bool,
    images_per_shard: int,
    keep_images: bool,
    captions_sha256: str | None = None,
    text_encoder: str | None = None,
) -> dict:
    """What fixes the output; a rerun into the same folder must match it exactly. The weights of the VAE
    and the text encoder are compared too, once loaded (`vae_sha256`, `text_encoder_sha256`, see
    `prepare_run`)."""
    return {
        "format_version": store.FORMAT_VERSION,
        "input_fingerprint": folder.fingerprint(),
        "num_input_images": len(folder.records),
        "resolution": resolution,
        "vae": vae,
        "flip": flip,
        "images_per_shard": images_per_shard,
        "keep_images": keep_images,
        "captions_sha256": captions_sha256,
        "text_encoder": text_encoder,
    }


# Stands for a setting that a run.json written before the setting existed does not record, and that
# cannot be inferred: any value is accepted, and `start_run` records the current one.
UNRECORDED = object()
# The value of a setting that a run.json written before the setting existed stands for.
SETTINGS_ADDED_LATER = {
    "keep_images": False,
    "captions_sha256": None,
    "text_encoder": None,
    "text_encoder_sha256": None,
    # Runs begun before the VAE was recorded by content: their weights are unknown. Refusing them would
    # lose their finished shards; they resume (with a warning) and their weights are checked from then on.
    "vae_sha256": UNRECORDED,
}


@dataclass(frozen=True)
class Run:
    folder: ImageFolder
    output: Path
    resolution: int
    vae: Vae | None  # None: pixel space (--vae none)
    flip: bool
    images_per_shard: int
    keep_images: bool  # write image files; never with pixel space, whose samples are the images
    captions: CaptionsFile | None = None  # text-to-image data: where the captions come from
    text_encoder: TextEncoder | None = None  # text-to-image data: encodes them

    @property
    def is_text(self) -> bool:
        return self.text_encoder is not None

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.folder.records) / self.images_per_shard)

    def shard_image_range(self, shard: int) -> range:
        start = shard * self.images_per_shard
        return range(start, min(start + self.images_per_shard, len(self.folder.records)))

    def settings(self) -> dict:
        settings = run_settings(
            self.folder,
            self.resolution,
            self.vae.name if self.vae else PIXEL_SPACE,
            self.flip,
            self.images_per_shard,
            self.keep_images,
            self.captions.sha256 if self.captions else None,
            self.text_encoder.name if self.text_encoder else None,
        )
        return settings | {
            "vae_sha256": self.vae.weights_sha256 if self.vae else None,
            "text_encoder_sha256": self.text_encoder.weights_sha256 if self.text_encoder else None,
        }

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

    def _condition_description(self) -> dict:
        if not self.is_text:
            return {"condition": "class"}
        encoder = self.text_encoder
        return {
            "condition": "text",
            "captions_file": str(self.captions.path),
            "captions_sha256": self.captions.sha256,
            "text_encoder": encoder.name,
            "text_encoder_sha256": encoder.weights_sha256,
            "text_encoder_protocol": TEXT_ENCODER_PROTOCOL,
            "context_shape": [encoder.max_length, encoder.dim],
            "context_dtype": np.dtype(CONTEXT_DTYPE).name,
        }

    def description(self) -> dict:
        """The metadata of the finished dataset that does not depend on which images were readable."""
        channels, height, width = self.stored_shape()
        common = {
            **self._condition_description(),
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
                "vae_sha256": None,
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
            "vae_sha256": self.vae.weights_sha256,
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
        changed = [
            f"{key}: {then[key]!r} then, {now!r} now"
            for key, now in settings.items()
            if then[key] is not UNRECORDED and then[key] != now
        ]
        if changed:
            raise UserError(
                f"--output {output} holds a run with other settings ({'; '.join(changed)}); "
                "rerun with the same arguments and input to resume, or choose a new --output"
            )
        if then.get("vae_sha256") is UNRECORDED and settings["vae_sha256"] is not None and not finished:
            log.warning(
                "%s was begun before the VAE's weights were recorded: its finished shards cannot be checked "
                "against the weights of --vae %s (sha256 %s), which are recorded now and checked on every rerun",
                run_file,
                settings["vae"],
                settings["vae_sha256"],
            )
    elif output.is_dir() and any(output.iterdir()):
        raise UserError(f"--output {output} is not empty and holds no {store.RUN_FILE}; choose a new folder")


def _check_not_nested(input_dir: Path, output: Path) -> None:
    """The output folder must be neither the input folder, nor inside it, nor around it: a rerun would
    read the unfinished dataset as input (an image folder without images) and could never resume."""
    source, target = input_dir.resolve(), output.resolve()
    if source == target:
        raise UserError(f"--output {output} is the --input folder: choose an output folder outside the input")
    if source in target.parents:
        raise UserError(
            f"--output {output} is inside --input {input_dir}: a rerun would read it as input; "
            "choose an output folder outside the input"
        )
    if target in source.parents:
        raise UserError(
            f"--input {input_dir} is inside --output {output}: choose an output folder that does not hold the input"
        )


def prepare_run(
    input_dir: str | Path,
    output: str | Path,
    resolution: int,
    vae_name: str,
    flip: bool,
    images_per_shard: int,
    device: torch.device,
    keep_images: bool = False,
    captions: str | Path | None = None,
    text_encoder: str | None = None,
) -> Run:
    """Every check that can fail, cheapest first; raises UserError before anything is written.

    With `captions` (a captions file, see `preprocessing.captions`), the images are those it lists and
    each is stored with its captions encoded by `text_encoder` (default DEFAULT_TEXT_ENCODER)."""
    if resolution <= 0:
        raise UserError(f"--resolution must be positive, got {resolution}")
    if images_per_shard <= 0:
        raise UserError(f"--images-per-shard must be positive, got {images_per_shard}")
    if text_encoder is not None and captions is None:
        raise UserError("--text-encoder needs --captions: without captions the data are class-conditional")
    _check_not_nested(Path(input_dir), Path(output))
    captions_file, text_name = None, None
    if captions is None:
        folder = scan_image_folder(input_dir)
    else:
        folder = captioned_image_folder(input_dir, captions)
        captions_file = CaptionsFile(Path(captions).resolve(), captions_sha256(captions))
        text_name = text_encoder_id(text_encoder or DEFAULT_TEXT_ENCODER)
    output = Path(output)
    pixel_space = vae_name == PIXEL_SPACE
    keep_images = keep_images and not pixel_space  # pixel samples are the images already
    vae_name = PIXEL_SPACE if pixel_space else vae_id(vae_name)
    text_sha256 = captions_file.sha256 if captions_file else None
    settings = run_settings(folder, resolution, vae_name, flip, images_per_shard, keep_images, text_sha256, text_name)
    _check_output(output, settings)
    vae = None if pixel_space else load_vae(vae_name, device)
    if vae is not None and resolution % vae.downsample:
        raise UserError(
            f"--resolution {resolution} is not divisible by {vae.downsample}, the downsampling "
            f"factor of the VAE {vae.name} (2 ** (len(block_out_channels) - 1))"
        )
    encoder = None if captions is None else load_text_encoder(text_name, device)
    run = Run(folder, output, resolution, vae, flip, images_per_shard, keep_images, captions_file, encoder)
    if vae is not None or encoder is not None:
        _check_output(output, run.settings())  # the same weights as the run it resumes
    return run


def start_run(run: Run) -> None:
    """Main process only, before any shard is written. A run.json written before some setting existed
    gets it added (the value `_check_output` accepted), so that later reruns compare it."""
    run.output.mkdir(parents=True, exist_ok=True)
    run_file, settings = run.output / store.RUN_FILE, run.settings()
    if not run_file.is_file():
        store.write_json(run_file, settings)
        return
    previous = store.read_json(run_file)
    if any(key not in previous for key in settings):
        store.write_json(run_file, settings | previous)


def _shard_array_files(run: Run, shard: int) -> list[str]:
    """The array files of a shard besides its samples: clean images, contexts."""
    return [store.shard_images_file(shard)] * run.keep_images + [store.shard_contexts_file(shard)] * run.is_text


def pending_shards(run: Run) -> list[int]:
    """Shards without their manifest or any of their array files: to be encoded (again)."""
    return [
        shard
        for shard in range(run.num_shards)
        if not store.is_shard_done(run.output, shard)
        or not all((run.output / name).is_file() for name in _shard_array_files(run, shard))
    ]


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


def _context_blocks(encoder: TextEncoder, captions: list[str], batch_size: int) -> Iterator[np.ndarray]:
    """(n, L, D) CONTEXT_DTYPE blocks of the captions' contexts, `batch_size` captions per forward."""
    for start in range(0, len(captions), batch_size):
        yield to_stored(encoder.encode(captions[start : start + batch_size]))


class _ShardBuffer:
    def __init__(self, run: Run, text_batch_size: int = DEFAULT_TEXT_BATCH_SIZE):
        self.run, self.text_batch_size = run, text_batch_size
        self.samples, self.clean_images, self.labels, self.images, self.skipped = [], [], [], [], []
        self.captions = []  # text data: the captions of each image in `images`

    def add(self, samples: np.ndarray, clean_images: np.ndarray | None, image_indices: list[int]) -> None:
        copies = 2 if self.run.flip else 1
        records = [self.run.folder.records[i] for i in image_indices]
        self.samples.append(samples)
        if clean_images is not None:
            self.clean_images.append(clean_images)
        self.labels += [record.label for record in records for _ in range(copies)]
        self.images += [record.path for record in records]
        self.captions += [list(record.captions) for record in records]

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
            self.run.output,
            shard,
            samples,
            self.labels,
            self.images,
            self.skipped,
            clean_images=clean_images,
            text=self._text() if self.run.is_text else None,
        )

    def _text(self) -> store.ShardText:
        """The shard's captions, encoded while they are written (never all in memory)."""
        encoder, copies = self.run.text_encoder, 2 if self.run.flip else 1
        captions = [caption for image_captions in self.captions for caption in image_captions]
        contexts = store.RowStream(
            len(captions),
            (encoder.max_length, encoder.dim),
            np.dtype(CONTEXT_DTYPE),
            _context_blocks(encoder, captions, self.text_batch_size),
        )
        counts = [len(image_captions) for image_captions in self.captions for _ in range(copies)]
        return store.ShardText(contexts, self.captions, counts)


def encode_shards(
    run: Run,
    shards: list[int],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    text_batch_size: int = DEFAULT_TEXT_BATCH_SIZE,
) -> None:
    """Encode and write the given shards; unreadable images are logged and left out (with their captions)."""
    batches = _shard_batches(run, shards, batch_size)
    loader = torch.utils.data.DataLoader(
        _ImageFiles(run),
        batch_sampler=[images for _, images in batches],
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    bar = tqdm(total=sum(len(images) for _, images in batches), unit="img", disable=not progress)
    buffer = _ShardBuffer(run, text_batch_size)
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
            buffer = _ShardBuffer(run, text_batch_size)
        bar.update(len(items))
    bar.close()


def finalize_run(run: Run) -> dict:
    """Main process only, after every shard is written. Text data get their null context here: the empty
    caption encoded alone by the main process, as sampling encodes it."""
    if not run.is_text:
        return store.finalize(run.output, run.num_shards, run.description())
    null_context = to_stored(run.text_encoder.null()[None])[0]  # (L, D) CONTEXT_DTYPE
    return store.finalize(run.output, run.num_shards, run.description(), null_context)
