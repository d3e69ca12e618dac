"""python -m preprocessing --input DIR --output DIR [--resolution 256] [--vae HUB_ID_OR_DIR | none] [--flip]
                          [--keep-images] [--captions FILE [--text-encoder HUB_ID_OR_DIR]]

Without --captions the data are class-conditional: the label of an image is its class subfolder. With
--captions (MS-COCO's captions_train2014.json, a JSON object {path: caption(s)}, or path<TAB>caption
lines) the images are those the file lists, and their captions are encoded by the text encoder.

Runs as one process, or as many under `torchrun` / `accelerate launch`: each process encodes its share
of the unfinished shards on its own device, and the main process writes the index at the end.
Rerunning the same command resumes an interrupted run. A mistake in the arguments or the input stops the
command with one line, `error: ...`, and exit status 2, before anything is written.
"""

import argparse
import logging
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState

from errors import ArgumentParser, UserError, run_cli
from preprocessing import store
from preprocessing.encode import (
    DEFAULT_IMAGES_PER_SHARD,
    DEFAULT_TEXT_BATCH_SIZE,
    PIXEL_SPACE,
    encode_shards,
    finalize_run,
    pending_shards,
    prepare_run,
    start_run,
)
from preprocessing.text import DEFAULT_TEXT_ENCODER

log = logging.getLogger("preprocessing")

DEFAULT_RESOLUTION = 256  # SPEC §4: ImageNet 256x256 (512 is the other setting of the paper)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # SPEC §4
# Images per VAE forward. fp32 SD-VAE encoder, measured on an H200: 12 GiB peak at 256 px, 49 GiB at 512 px.
DEFAULT_BATCH_SIZE = 64
DEFAULT_NUM_WORKERS = 4  # JPEG decoding and resizing keep up with the VAE on one GPU with about this many
# Processes wait for each other around the work; a slow folder scan on a network disk must not time out.
BARRIER_TIMEOUT = timedelta(hours=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m preprocessing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        required=True,
        type=Path,
        metavar="DIR",
        help="image folder: one subfolder per class (label = sorted subfolder index); with --captions, any "
        "layout holding the images the captions file lists (required)",
    )
    parser.add_argument(
        "--output", required=True, type=Path, metavar="DIR", help="dataset folder to create or resume (required)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=DEFAULT_RESOLUTION,
        metavar="N",
        help="side of the ADM center crop, in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--vae",
        default=DEFAULT_VAE,
        metavar="ID_OR_DIR",
        help=f"AutoencoderKL hub id or local directory; '{PIXEL_SPACE}' stores pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--flip", action="store_true", help="also store the horizontal mirror of every image (default: off)"
    )
    parser.add_argument(
        "--keep-images",
        action="store_true",
        help="also store the clean center-cropped image of every sample, uint8 (REPA's encoder input); "
        f"with --vae {PIXEL_SPACE} the samples are the images and nothing more is written (default: off)",
    )
    parser.add_argument(
        "--captions",
        type=Path,
        metavar="FILE",
        help="text-to-image data: captions file (COCO annotation JSON, JSON {path: caption or [captions]}, or "
        "path<TAB>caption lines; paths relative to --input); the images are those it lists "
        "(default: none, class labels from the folder layout)",
    )
    parser.add_argument(
        "--text-encoder",
        metavar="ID_OR_DIR",
        help=f"CLIP text encoder hub id or local directory, with --captions only (default: {DEFAULT_TEXT_ENCODER})",
    )
    parser.add_argument(
        "--text-batch-size",
        type=int,
        default=DEFAULT_TEXT_BATCH_SIZE,
        metavar="N",
        help="captions per text encoder forward, per process (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="images per encoding batch, per process (default: %(default)s)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=DEFAULT_NUM_WORKERS,
        metavar="N",
        help="image decoding processes, per process; 0 decodes in the main process (default: %(default)s)",
    )
    parser.add_argument(
        "--images-per-shard",
        type=int,
        default=DEFAULT_IMAGES_PER_SHARD,
        metavar="N",
        help="source images per output shard, the unit of resumption (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be non-negative, got {args.num_workers}")
    if args.text_batch_size <= 0:
        raise UserError(f"--text-batch-size must be positive, got {args.text_batch_size}")
    if args.text_encoder is not None and args.captions is None:
        raise UserError("--text-encoder needs --captions: without captions the data are class-conditional")
    return args


def _log_to(path: Path | None, rank: int, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    for handler in log.handlers[:]:
        handler.close()
        log.removeHandler(handler)
    form = logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s")
    handlers = [logging.StreamHandler(sys.stderr)] + ([logging.FileHandler(path)] if path else [])
    for handler in handlers:
        handler.setFormatter(form)
        # Other ranks log only warnings (skipped images) to the terminal; everything goes to the file.
        handler.setLevel(
            logging.INFO if is_main or isinstance(handler, logging.FileHandler) else logging.WARNING
        )
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # accelerate sets up several CPU processes (gloo) only when asked to use the CPU.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    rank, world_size, is_main = state.process_index, state.num_processes, state.is_main_process
    _log_to(None, rank, is_main)
    run = prepare_run(
        args.input,
        args.output,
        args.resolution,
        args.vae,
        args.flip,
        args.images_per_shard,
        state.device,
        keep_images=args.keep_images,
        captions=args.captions,
        text_encoder=args.text_encoder,
    )
    if args.keep_images and run.vae is None:
        log.info("--keep-images with --vae %s: the stored pixels are the clean images", PIXEL_SPACE)
    if (run.output / store.INDEX_FILE).is_file():
        log.info("%s is already complete; nothing to do", run.output)
        return store.read_json(run.output / store.INDEX_FILE)

    state.wait_for_everyone()  # every process has validated before the output folder is touched
    if is_main:
        start_run(run)
    state.wait_for_everyone()
    _log_to(run.output / store.LOG_FILE, rank, is_main)
    pending = pending_shards(run)
    state.wait_for_everyone()  # every process has listed the unfinished shards before any is written
    if is_main:
        records = run.folder.records
        log.info(
            "%d images, %s, %d of %d shards to encode on %d process(es) into %s",
            len(records),
            f"{sum(len(record.captions) for record in records)} captions"
            if run.is_text
            else f"{len(run.folder.class_names)} classes",
            len(pending),
            run.num_shards,
            world_size,
            run.output,
        )
    encode_shards(
        run,
        pending[rank::world_size],
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=state.device,
        progress=is_main,
        text_batch_size=args.text_batch_size,
    )
    state.wait_for_everyone()
    if not is_main:
        return {}
    index = finalize_run(run)
    log.info(
        "done: %d samples from %d images%s in %d shards; %d unreadable images skipped%s",
        index["num_samples"],
        index["num_images"],
        f" with {index['num_captions']} captions" if run.is_text else "",
        len(index["shards"]),
        index["num_skipped"],
        f" (listed in {run.output / store.SKIPPED_FILE})" if index["num_skipped"] else "",
    )
    return index


if __name__ == "__main__":
    run_cli(main)
