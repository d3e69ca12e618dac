"""Text-image agreement of text-to-image samples: CLIP score and PickScore.

    python -m evaluations.clip_score SAMPLES.npz --clip-model openai/clip-vit-large-patch14 \\
        [--pickscore-model yuvalkirstain/PickScore_v1] [--num-samples N] [--device cuda]

SAMPLES is what the sampler writes for a text-conditioned model: `arr_0` uint8 (N, H, W, 3) and
`captions` (N,), a unicode array holding the caption each image was generated from. Both metrics embed
image and caption with a CLIP model (image: vision tower's pooled output -> visual projection; text: text
tower's pooled output -> text projection; both L2-normalized) and score their cosine:

- CLIP score = 100 * max(cos, 0), torchmetrics' CLIPScore convention (with openai/clip-vit-large-patch14,
  its default model);
- PickScore (Kirstain et al. 2023) = logit_scale.exp() * cos with the PickScore model (a CLIPModel whose
  processor lives in another repository, laion/CLIP-ViT-H-14-laion2B-s32B-b79K); the number of the SRA
  paper's text-to-image table.

Each is printed as the mean over the first N samples with its standard error, and written to a JSON file
beside SAMPLES with the models, their weights' sha256 and the versions.
"""

import argparse
import importlib.metadata
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from errors import ArgumentParser, UserError, run_cli
from models import weights_sha256

from .evaluator import check_device
from .features import exact_float32, prefetch
from .images import NpzImages, check_npz_file, read_array

CAPTIONS_KEY = "captions"  # the sampler's (N,) unicode array of the caption behind each image
BATCH_SIZE = 100  # images and captions per forward pass of each model
MIN_SAMPLES = 2  # a standard error needs at least two scores
CLIP_SCORE_SCALE = 100.0  # torchmetrics CLIPScore: 100 * max(cos, 0)
CLIP_MODEL_EXAMPLE = "openai/clip-vit-large-patch14"  # torchmetrics CLIPScore's default model
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"  # Kirstain et al. 2023, the released PickScore
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor PickScore's README loads
CONFIG_FILE = "config.json"  # transformers' CONFIG_NAME, written by save_pretrained
CLIP_MODEL_TYPE = "clip"  # config.model_type of a full CLIPModel (text and vision towers)
CLIP_SCORE_DEFINITION = "100 * max(cos, 0), torchmetrics CLIPScore's convention"
PICKSCORE_DEFINITION = "logit_scale.exp() * cos, Kirstain et al. 2023"
PICKSCORE_UNAVAILABLE = (
    f"unavailable: pass --pickscore-model {PICKSCORE_MODEL} (a hub id or a local copy) to compute it"
)
SAMPLES_EXPECTED = f"an .npz written by the text-to-image sampler, with `arr_0` images and `{CAPTIONS_KEY}`"


def build_parser():
    parser = ArgumentParser(
        prog="python -m evaluations.clip_score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "samples",
        metavar="SAMPLES",
        type=Path,
        help=f"sample .npz with `arr_0` uint8 (N, H, W, 3) and `{CAPTIONS_KEY}` (N,) unicode",
    )
    parser.add_argument(
        "--clip-model",
        required=True,
        metavar="MODEL",
        help=f"CLIP model for the CLIP score, a hub id or a local folder: {CLIP_MODEL_EXAMPLE} gives the "
        "torchmetrics number (required)",
    )
    parser.add_argument(
        "--pickscore-model",
        default=None,
        metavar="MODEL",
        help=f"PickScore model, a hub id or a local folder, e.g. {PICKSCORE_MODEL} "
        "(default: none, and PickScore is reported unavailable)",
    )
    parser.add_argument(
        "--pickscore-processor",
        default=PICKSCORE_PROCESSOR,
        metavar="MODEL",
        help="tokenizer and image processor of the PickScore model, a hub id or a local folder (default: %(default)s)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        metavar="N",
        help="score the first N samples; more than SAMPLES holds is an error (default: all of them)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        metavar="N",
        help="images and captions per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device of the models (default: %(default)s here; cuda where available, else cpu)",
    )
    parser.add_argument(
        "--output-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="metrics file (default: SAMPLES_STEM_text_metrics.json beside SAMPLES)",
    )
    return parser


def parse_args(argv=None):
    """Flags checked for range, device and output folder; the files are checked by `open_samples`."""
    args = build_parser().parse_intermixed_args(argv)
    if args.num_samples is not None and args.num_samples < MIN_SAMPLES:
        raise UserError(f"--num-samples {args.num_samples}: at least {MIN_SAMPLES} are needed for a standard error")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: at least 1 is needed")
    check_device(args.device)
    if args.output_json is not None and not args.output_json.parent.is_dir():
        raise UserError(f"--output-json {args.output_json}: no folder {args.output_json.parent}")
    return args


# --- inputs ---------------------------------------------------------------------------------------------


def read_captions(path):
    """The (N,) unicode `captions` of a sample `.npz`, checked; no pickles (np.load refuses object arrays)."""
    with np.load(path) as npz:
        if CAPTIONS_KEY not in npz.files:
            raise UserError(
                f"{path}: this file has no captions: it was sampled from a class-conditional model, or by another "
                f"tool (keys: {npz.files}); the text metrics need the `{CAPTIONS_KEY}` array beside `arr_0`"
            )
        captions = read_array(npz, CAPTIONS_KEY, path)
    if captions.ndim != 1 or captions.dtype.kind != "U":
        raise UserError(
            f"{path}[{CAPTIONS_KEY}]: expected a 1-D unicode string array (dtype '<U…'), "
            f"got {captions.dtype} of shape {captions.shape}"
        )
    return captions


def open_samples(path, num_samples):
    """(images, captions, N): the checked `arr_0` stream and the first N captions, N = all by default."""
    check_npz_file(path, SAMPLES_EXPECTED)
    images = NpzImages(path)
    captions = read_captions(path)
    if len(captions) != images.num_images:
        raise UserError(
            f"{path}: {images.num_images} images but {len(captions)} captions; each image needs the caption "
            "it was generated from"
        )
    count = images.num_images
    if num_samples is None:
        num_samples = count
        if count < MIN_SAMPLES:
            raise UserError(f"{path}: holds {count} image(s); a standard error needs at least {MIN_SAMPLES}")
    elif num_samples > count:
        raise UserError(
            f"{path}: holds {count} images, fewer than --num-samples {num_samples}; "
            f"pass --num-samples {count} or leave it out to use them all"
        )
    return images, captions[:num_samples], num_samples


# --- models ---------------------------------------------------------------------------------------------


def model_name(name):
    """What the JSON records: the absolute path of a local folder, else the hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def looks_like_a_path(name):
    """Written as a path (/…, ./…, ../…, ~…), not as a hub id (`org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def check_local_folder(flag, name):
    """Raise where `name` is written as a path but is no folder; hub ids are left to transformers."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {name}: a file; expected a model folder (as save_pretrained writes) or a hub id")
    if not path.exists() and looks_like_a_path(name):
        raise UserError(f"{flag} {name}: no such folder")


def first_line(error):
    """The first non-empty line of an exception's message (transformers' messages run to paragraphs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def check_clip_config(flag, name):
    """Raise unless `name` is a local folder or hub id with a full CLIP config (read before any weights)."""
    from transformers import AutoConfig

    check_local_folder(flag, name)
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{flag} {name}: no {CONFIG_FILE}; expected a model folder as save_pretrained writes it")
    try:
        config = AutoConfig.from_pretrained(model_name(name))
    except (OSError, ValueError, KeyError) as error:  # missing folder or repo, no network, unknown type
        raise UserError(f"{flag} {name}: cannot load its config ({first_line(error)})") from error
    if config.model_type != CLIP_MODEL_TYPE:
        raise UserError(
            f"{flag} {name}: a {config.model_type!r} model; expected a CLIPModel (model_type {CLIP_MODEL_TYPE!r}) "
            "with text and vision towers"
        )


def load_processor(flag, name):
    """The tokenizer and image processor of a CLIP model (small files: loaded before any weights)."""
    from transformers import AutoProcessor

    check_local_folder(flag, name)
    try:
        processor = AutoProcessor.from_pretrained(model_name(name))
    except (OSError, ValueError, KeyError, TypeError) as error:  # missing files, no network, other formats
        raise UserError(f"{flag} {name}: cannot load the processor ({first_line(error)})") from error
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        raise UserError(
            f"{flag} {name}: gives a {type(processor).__name__}, not a processor with both a tokenizer and an "
            "image processor (preprocessor_config.json)"
        )
    return processor


def load_model(flag, name, device):
    """The CLIPModel in float32, eval mode, on `device`; a UserError that says why where it fails."""
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(model_name(name), dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # missing weights, shape mismatches
        raise UserError(f"{flag} {name}: cannot load the CLIP model ({first_line(error)})") from error
    return model.to(device).eval().requires_grad_(False)


@dataclass
class ModelRequest:
    """A CLIP model asked for on the command line, with the flags that name it and its processor."""

    flag: str
    name: str
    processor_flag: str
    processor_name: str


def model_requests(args):
    """{"clip": request, "pickscore": request or None}, from the flags."""
    pickscore = None
    if args.pickscore_model is not None:
        pickscore = ModelRequest(
            "--pickscore-model", args.pickscore_model, "--pickscore-processor", args.pickscore_processor
        )
    return {
        "clip": ModelRequest("--clip-model", args.clip_model, "--clip-model", args.clip_model),
        "pickscore": pickscore,
    }


def load_models(requests, device):
    """{key: (model, processor) or None}: every config and processor is checked (small files) before the
    first weights are read."""
    wanted = {key: request for key, request in requests.items() if request is not None}
    for request in wanted.values():
        check_clip_config(request.flag, request.name)
    processors = {
        key: load_processor(request.processor_flag, request.processor_name) for key, request in wanted.items()
    }
    loaded = {key: (load_model(request.flag, request.name, device), processors[key]) for key, request in wanted.items()}
    return {key: loaded.get(key) for key in requests}


# --- scores ---------------------------------------------------------------------------------------------


def text_max_length(model, tokenizer):
    """Tokens per caption: the tokenizer's length (CLIP's 77), at most the text tower's positions."""
    return min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)


@torch.no_grad()
def image_text_scores(model, processor, images_uint8_nhwc, captions, device):
    """Cosine of each image's and its caption's CLIP embeddings, (B,) float32 on the CPU.

    Images: uint8 (B, H, W, 3) RGB through the processor's image preprocessing (resize the shortest side,
    center crop, CLIP normalization); embedding = visual_projection(vision_model(...).pooler_output).
    Captions: tokenized with padding and truncation at the tokenizer's length (77 for CLIP); embedding =
    text_projection(text_model(...).pooler_output). Both L2-normalized. `model` must be on `device`.
    """
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    processed = processor.image_processor(images=list(images), input_data_format="channels_last", return_tensors="pt")
    pixels = processed["pixel_values"]  # (B, 3, S, S), S the model's image size
    length = text_max_length(model, processor.tokenizer)
    tokens = processor.tokenizer(
        [str(caption) for caption in captions],
        padding="max_length",
        truncation=True,
        max_length=length,
        return_tensors="pt",
    )
    with exact_float32():  # TF32 off (the patch convolution would use it on a GPU): the same number anywhere
        image_embedding = model.visual_projection(
            model.vision_model(pixel_values=pixels.to(device, torch.float32)).pooler_output
        )
        text_embedding = model.text_projection(
            model.text_model(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            ).pooler_output
        )
    image_embedding = F.normalize(image_embedding.float(), dim=-1)
    text_embedding = F.normalize(text_embedding.float(), dim=-1)
    return (image_embedding * text_embedding).sum(-1).cpu()


def clip_scores(cosines):
    """torchmetrics' CLIPScore per sample: 100 * max(cos, 0)."""
    return CLIP_SCORE_SCALE * cosines.clamp_min(0)


def pickscores(cosines, model):
    """PickScore per sample: the model's learned temperature logit_scale.exp() times cos, unclamped."""
    return model.logit_scale.detach().float().exp().cpu() * cosines


def mean_and_standard_error(scores):
    """(mean, std / sqrt(N)) in float64, std with N - 1 in its denominator (the sample standard deviation)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(scores.mean()), float(scores.std(ddof=1) / math.sqrt(len(scores)))


def score_samples(images, captions, num_samples, batch_size, device, clip, pickscore=None):
    """Per-sample CLIP scores and PickScores (None without a PickScore model) of the first N samples.

    `clip` and `pickscore` are (model, processor) pairs on `device`; the file is read once, a batch at a time.
    """
    clip_values, pick_values, done = [], [], 0
    with tqdm(total=num_samples, desc="text metrics", unit="img") as progress:
        for batch in prefetch(images.batches(batch_size, num_samples)):
            batch_captions = captions[done : done + len(batch)]
            clip_values.append(clip_scores(image_text_scores(*clip, batch, batch_captions, device)))
            if pickscore is not None:
                cosines = image_text_scores(*pickscore, batch, batch_captions, device)
                pick_values.append(pickscores(cosines, pickscore[0]))
            done += len(batch)
            progress.update(len(batch))
    if done != num_samples:
        raise ValueError(f"read {done} images, expected {num_samples}")
    return torch.cat(clip_values), torch.cat(pick_values) if pickscore is not None else None


# --- the command ----------------------------------------------------------------------------------------


def format_score(name, scores, num_samples):
    """`NAME: mean ± standard error (N samples)`, or PickScore's unavailable line where `scores` is None."""
    if scores is None:
        return f"{name}: {PICKSCORE_UNAVAILABLE}"
    mean, error = mean_and_standard_error(scores)
    return f"{name}: {mean:.4f} ± {error:.4f} (mean ± standard error over {num_samples} samples)"


def weights_record(key, request, model):
    """JSON fields naming a model: hub id or absolute path, its processor's, and its weights' sha256 by
    content; all null where the model was not asked for."""
    return {
        f"{key}_model": None if request is None else model_name(request.name),
        f"{key}_processor": None if request is None else model_name(request.processor_name),
        f"{key}_weights_sha256": None if model is None else weights_sha256(model.state_dict()),
    }


def build_record(args, num_samples, requests, loaded, scores):
    """What the JSON holds: both metrics with their standard errors (PickScore null, with the reason,
    where no model was given), the models by name and by weights, and the versions."""
    record = {}
    for key, definition in [("clip_score", CLIP_SCORE_DEFINITION), ("pickscore", PICKSCORE_DEFINITION)]:
        mean, error = (None, None) if scores[key] is None else mean_and_standard_error(scores[key])
        record.update({key: mean, f"{key}_standard_error": error, f"{key}_definition": definition})
    record["pickscore_note"] = PICKSCORE_UNAVAILABLE if scores["pickscore"] is None else None
    record.update(samples=str(args.samples), num_samples=num_samples)
    for key, request in requests.items():
        record.update(weights_record(key, request, None if loaded[key] is None else loaded[key][0]))
    record.update(
        device=str(torch.device(args.device)),
        torch=torch.__version__,
        transformers=importlib.metadata.version("transformers"),
        python=platform.python_version(),
    )
    return record


def main(argv=None):
    args = parse_args(argv)
    images, captions, num_samples = open_samples(args.samples, args.num_samples)
    requests = model_requests(args)
    loaded = load_models(requests, args.device)

    clip_values, pick_values = score_samples(
        images, captions, num_samples, args.batch_size, args.device, loaded["clip"], loaded["pickscore"]
    )
    scores = {"clip_score": clip_values, "pickscore": pick_values}
    print(format_score("CLIP score", clip_values, num_samples))
    print(format_score("PickScore", pick_values, num_samples))

    record = build_record(args, num_samples, requests, loaded, scores)
    output = args.output_json or args.samples.with_name(f"{args.samples.stem}_text_metrics.json")
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    return record


if __name__ == "__main__":
    run_cli(main)
