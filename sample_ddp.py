"""Sample N images from a DiT/SiT/MMDiT checkpoint into one `.npz` for the ADM evaluator (evaluations/).

    torchrun --nproc_per_node=8 sample_ddp.py --ckpt results/sit-xl2-sra/checkpoints/step_4000000.pt \\
        --preset sit-xl2-sra-256-cfg
    python sample_ddp.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --num-samples 1000   # one process
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt results/mmdit-coco-sra/checkpoints/step_0150000.pt \\
        --preset mmdit-coco-ode50 --captions coco/annotations/captions_val2014.json   # text to image

The file goes to results/samples/ (git-ignored, like every tool's output) under a name derived from
the settings; --output-dir or --output (a path ending in .npz) choose another place. An existing file
there is reused only when the settings record beside it (NAME.json) matches; any other file is refused,
never overwritten.

Each sample's noise (the initial noise and a stochastic sampler's) and condition (its label, or its
caption from --captions) depend on (--seed, its index) only, so the images do not depend on the number
of processes or the batch size. A text model's `.npz` also holds each sample's caption (`captions`) and
its position in the captions file (`caption_index`), for the CLIP score and PickScore. Rerunning the
same command after an interruption resumes: finished batches are kept and the final file is identical
to an uninterrupted run's.
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

import models
import sampling
from conditioning import CLASS, TEXT
from errors import ArgumentParser, UserError, run_cli
from preprocessing.text import DEFAULT_TEXT_ENCODER, load_text_encoder
from sampling import (
    DEFAULT_VAE,
    DEFAULTS,
    NO_VAE,
    PRESET_NAMES,
    ROUNDINGS,
    BatchSampler,
    ShardStore,
    barrier,
    build_objective,
    check_compatible,
    check_settings,
    close_distributed,
    init_distributed,
    load_decoder,
    load_model,
    plan_batches,
    resolve,
    save_pngs,
    sum_over_processes,
    training_info,
    write_settings,
)
from sampling.shards import SETTINGS_FILE, temp_files

PER_PROC_BATCH_SIZE = 32  # DiT release sample_ddp.py; raise it on large GPUs
VAE_BATCH_SIZE = 64  # images per VAE decoder call: bounds the decoder's memory at 256-512 px
DEFAULT_OUTPUT_DIR = "results/samples"  # results/ is git-ignored, and every tool writes under it


# --- configuration -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = ArgumentParser(
        prog="sample_ddp.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    flag = parser.add_argument
    preset_or = "the preset's, else"  # flags a --preset sets: their default is the preset's value
    flag("--ckpt", required=True, metavar="PATH",
         help="this project's checkpoint or a public DiT/SiT/SRA/REPA release (required)")
    flag("--model", choices=models.MODEL_NAMES, metavar="NAME",
         help="model name, needed only for a bare state dict (DiT/SiT releases), e.g. SiT-XL/2; one of "
              "DiT-/SiT-{T,S,B,L,XL}/{2,4,8} (default: read from the checkpoint)")
    flag("--time-convention", choices=(models.DATA_AT_0, models.DATA_AT_1, models.DISCRETE_STEPS),
         help="data_at_1: SiT release; data_at_0: SRA/REPA/this project; ddpm: DiT steps "
              "(default: inferred from the checkpoint)")
    flag("--weights", choices=("ema", "model"), default="ema",
         help="EMA weights (the papers') or the online ones (default: %(default)s)")
    flag("--preset", choices=PRESET_NAMES,
         help="a paper's evaluation settings; the flags below override it (default: none)")
    flag("--sampler", choices=("ddpm", "ddim", "sde", "euler", "heun"),
         help=f"DiT: ddpm or ddim; SiT: sde, euler or heun (ODE) (default: {preset_or} ddpm for DiT, sde for SiT)")
    flag("--num-steps", type=int, metavar="N", help=f"sampling steps (default: {preset_or} 250)")
    flag("--ddim-eta", type=float, metavar="ETA",
         help=f"DDIM noise, 0 = deterministic (default: {preset_or} {DEFAULTS['ddim_eta']:g})")
    flag("--cfg-scale", type=float, metavar="SCALE",
         help=f"classifier-free guidance scale, 1 = none (default: {preset_or} {DEFAULTS['cfg_scale']:g})")
    flag("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
         help="guide only where LOW <= t <= HIGH, t the noise level in [0, 1] "
              f"(default: {preset_or} {' '.join(f'{x:g}' for x in DEFAULTS['guidance_interval'])})")
    flag("--cfg-channels", choices=("all", "3"),
         help=f"guide all latent channels or the first 3 (releases) (default: {preset_or} {DEFAULTS['cfg_channels']})")
    flag("--num-samples", type=int, metavar="N",
         help=f"total images (default: {preset_or} {DEFAULTS['num_samples']})")
    flag("--per-proc-batch-size", type=int, default=PER_PROC_BATCH_SIZE, metavar="N",
         help="images per process per batch (default: %(default)s)")
    flag("--seed", type=int, default=0, help="each sample's noise and label come from (seed, its index) "
                                             "(default: %(default)s)")
    flag("--balanced-classes", action="store_true",
         help="each class num_samples / num_classes times (default: off, labels uniform at random)")
    flag("--captions", metavar="FILE",
         help="text models: captions to draw from, one image uniformly then one of its captions per sample "
              "(COCO annotation JSON, a JSON {image: captions} or path<TAB>caption lines) (default: none; "
              "required for text models)")
    flag("--text-encoder", metavar="ID_OR_DIR",
         help="text models: the CLIP text encoder of the captions; it must be the one the model was trained "
              f"with (default: the checkpoint's training encoder, else {DEFAULT_TEXT_ENCODER})")
    flag("--vae", metavar="ID_OR_DIR",
         help=f"VAE hub id or local directory, or '{NO_VAE}' for pixel-space models "
              f"(default: the checkpoint's training VAE, else {DEFAULT_VAE})")
    flag("--vae-batch-size", type=int, default=VAE_BATCH_SIZE, metavar="N",
         help="images per VAE decoder call (default: %(default)s)")
    flag("--image-size", type=int, metavar="N",
         help="expected image size; an error if the model and VAE give another (default: not checked)")
    flag("--rounding", choices=tuple(ROUNDINGS),
         help="; ".join(f"{name}: {how}" for name, how in ROUNDINGS.items())
              + f" (default: {preset_or} {DEFAULTS['rounding']})")
    flag("--mixed-precision", choices=("bf16", "no"), default="bf16",
         help="bf16 autocast, GPU only (default: %(default)s)")
    flag("--tf32", choices=("on", "off"), default="on", help="TF32 matmuls on GPU (default: %(default)s)")
    flag("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
         help="where the .npz goes; its name is derived from the settings; --output-dir samples is the "
              "older default (default: %(default)s)")
    flag("--output", metavar="PATH",
         help="the .npz path (it must end in .npz), instead of the derived name in --output-dir "
              "(default: derived)")
    flag("--save-png", action="store_true", help="also write every image as a PNG (default: off)")
    return parser.parse_args(argv)


def resolve_settings(args) -> dict:
    overrides = {
        "sampler": args.sampler, "num_steps": args.num_steps, "ddim_eta": args.ddim_eta,
        "cfg_scale": args.cfg_scale, "guidance_interval": args.guidance_interval,
        "cfg_channels": args.cfg_channels, "rounding": args.rounding, "num_samples": args.num_samples,
    }
    settings = resolve(args.preset, overrides)
    settings.update(seed=args.seed, balanced_classes=args.balanced_classes,
                    per_proc_batch_size=args.per_proc_batch_size, vae_batch_size=args.vae_batch_size)
    if args.captions is not None and not Path(args.captions).is_file():
        raise UserError(f"--captions {args.captions}: no such file")
    check_numbers(settings)
    return settings


def check_numbers(settings):
    for key in ("num_samples", "per_proc_batch_size", "vae_batch_size"):
        if settings[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {settings[key]}")
    if settings["num_steps"] is not None and settings["num_steps"] < 1:
        raise UserError(f"--num-steps must be >= 1, got {settings['num_steps']}")
    if settings["seed"] < 0:
        raise UserError(f"--seed must be >= 0, got {settings['seed']}")
    # A scale <= 0 drops or inverts the conditional prediction: never meant, so refused.
    if not 0 < settings["cfg_scale"] < math.inf:
        raise UserError(f"--cfg-scale must be finite and > 0 (1 means no guidance, above 1 guides), got "
                        f"{settings['cfg_scale']:g}")
    low, high = settings["guidance_interval"]
    if not 0.0 <= low <= high <= 1.0:
        raise UserError(f"--guidance-interval needs 0 <= LOW <= HIGH <= 1, got {low} {high}")
    if not 0 <= settings["ddim_eta"] < math.inf:
        raise UserError(f"--ddim-eta must be finite and >= 0, got {settings['ddim_eta']}")


def fill_sampler(settings, objective, family):
    """The objective's default sampler and steps where none was chosen; errors for misfits."""
    if settings["family"] is not None and settings["family"] != family:
        raise UserError(f"the preset is for {settings['family']} models; the checkpoint holds {family}")
    settings["sampler"] = settings["sampler"] or objective.default_method
    settings["num_steps"] = settings["num_steps"] or objective.default_num_steps
    steps = objective.discrete_steps  # DDPM: respacing keeps 2 to T of its T steps
    if steps is not None and not 2 <= settings["num_steps"] <= steps:
        raise UserError(f"--num-steps {settings['num_steps']} does not fit a {family} model: it samples with "
                        f"2 to {steps} of its {steps} steps")
    if settings["sampler"] not in objective.sampler_methods:
        raise UserError(f"--sampler {settings['sampler']} does not fit a {family} model; "
                        f"choose one of {', '.join(objective.sampler_methods)}")
    if settings["ddim_eta"] and settings["sampler"] != "ddim":
        raise UserError(f"--ddim-eta applies to the ddim sampler, not {settings['sampler']}")


def condition_source(args, settings, loaded, info, device):
    """Each index's condition: labels for a class-conditional model; for a text model, captions from
    --captions through the training run's text encoder (checked by content against the checkpoint)."""
    family = models.family_of(loaded.name)
    if family.condition == CLASS:
        if args.captions is not None or args.text_encoder is not None:
            raise UserError(f"--captions and --text-encoder are for text-conditioned models; {loaded.name} is "
                            "conditioned on class labels")
        return sampling.condition_source(CLASS, settings["seed"], settings["num_samples"],
                                         num_classes=loaded.model.num_classes, balanced=settings["balanced_classes"])
    if args.captions is None:
        raise UserError(f"{loaded.name} is conditioned on text: pass --captions FILE (e.g. COCO's "
                        "captions_val2014.json)")
    if settings["balanced_classes"]:
        raise UserError(f"--balanced-classes is for class-conditional models; {loaded.name} is conditioned on text")
    trained = info.get("condition") or {}
    encoder = load_text_encoder(args.text_encoder or trained.get("text_encoder") or DEFAULT_TEXT_ENCODER, device)
    if trained.get("text_encoder_sha256") not in (None, encoder.weights_sha256):
        raise UserError(f"{args.ckpt} was trained on contexts of the text encoder {trained.get('text_encoder')} "
                        f"(weights sha256 {trained['text_encoder_sha256'][:12]}); {encoder.name} has other weights "
                        f"({encoder.weights_sha256[:12]})")
    if encoder.dim != loaded.model.context_dim:
        raise UserError(f"the text encoder {encoder.name} gives {encoder.dim}-wide contexts; {loaded.name} takes "
                        f"{loaded.model.context_dim}")
    return sampling.condition_source(TEXT, settings["seed"], settings["num_samples"], captions=args.captions,
                                     encoder=encoder)


def image_settings(args, settings, loaded, decoder, image_size, device, source) -> dict:
    """Everything that decides the images: a rerun must match it to reuse finished batches."""
    record = {
        # The weights are identified by content: weights retrained into the same path (even of the same
        # size) are other settings, while the same weights moved to another path reuse the finished
        # samples, since they would be the same images. The path stays as information only
        # (sampling.shards.INFORMATION_KEYS).
        "ckpt": str(Path(args.ckpt).resolve()), "ckpt_sha256": models.weights_sha256(loaded.model.state_dict()),
        "weights": loaded.source, "model": loaded.name, "time_convention": loaded.time_convention,
        "vae": decoder.name, "image_size": image_size,
        "mixed_precision": args.mixed_precision if device.type == "cuda" else "no",
        "tf32": args.tf32 if device.type == "cuda" else "off",
    }
    for key in ("sampler", "num_steps", "cfg_scale", "guidance_interval", "cfg_channels", "rounding",
                "num_samples", "seed", "balanced_classes"):
        record[key] = settings[key]
    if settings["sampler"] == "ddim":
        record["ddim_eta"] = settings["ddim_eta"]
    return {**record, **source.identity()}


def output_path(args, settings, loaded) -> Path:
    if args.output is not None:
        return Path(args.output)
    low, high = settings["guidance_interval"]
    name = f"{loaded.name.replace('/', '-')}-{Path(args.ckpt).stem}"
    name += f"-{settings['sampler']}{settings['num_steps']}-cfg{settings['cfg_scale']:g}"
    if settings["cfg_scale"] != 1.0 and (low, high) != (0.0, 1.0):
        name += f"-interval{low:g}-{high:g}"
    if settings["cfg_scale"] != 1.0 and settings["cfg_channels"] != "all":
        name += f"-ch{settings['cfg_channels']}"
    if settings["balanced_classes"]:
        name += "-balanced"
    if args.captions is not None:
        name += f"-{Path(args.captions).stem}"
    name += f"-{settings['rounding']}-seed{settings['seed']}-{settings['num_samples']}"
    return Path(args.output_dir) / f"{name}.npz"


def settings_line(record, settings_path) -> str:
    """The settings in one line (all of them go to settings_path): printed once, not as a JSON block."""
    text = (f"settings: {record['model']}, {record['weights']} weights (sha256 {record['ckpt_sha256'][:12]}), "
            f"{record['sampler']} {record['num_steps']} steps, cfg {record['cfg_scale']:g}")
    if record["cfg_scale"] != 1.0:
        low, high = record["guidance_interval"]
        text += f" on t in [{low:g}, {high:g}], {record['cfg_channels']} channels"
    if "ddim_eta" in record:
        text += f", eta {record['ddim_eta']:g}"
    text += (f", {record['num_samples']} images of {record['image_size']} px"
             f"{' (balanced classes)' if record['balanced_classes'] else ''}, seed {record['seed']}, "
             f"{record['rounding']} rounding, vae {record['vae']}; all of them in {settings_path} when done")
    return text


def check_writable(directory: Path) -> None:
    """Error unless the directory exists or can be created, and may be written to. Creates nothing:
    a run refused for its checkpoint or flags leaves no trace."""
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"the output directory {directory} is not writable: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"the output directory {directory} is not writable: {existing} denies writing")


def check_output(npz_path: Path, save_png: bool) -> None:
    """Error unless `npz_path` can be this run's output: a `.npz` name, in a writable directory, and, if
    it exists, a file with a settings record beside it (NAME.json, or the NAME.work/settings.json of a run
    killed just after assembling it), which check_settings then compares. Neither the settings file, the
    work folder nor the PNG folder may be in the way. Creates nothing."""
    if npz_path.suffix != ".npz":
        raise UserError(f"--output {npz_path} must end in .npz (the evaluator reads .npz files), e.g. "
                        f"{npz_path.with_name(npz_path.name + '.npz')}")
    check_writable(npz_path.parent)
    settings_path, work_dir = npz_path.with_suffix(".json"), npz_path.with_suffix(".work")
    if npz_path.exists() and not npz_path.is_file():
        raise UserError(f"{npz_path} exists and is not a file; pass another --output")
    if npz_path.is_file() and not settings_path.is_file() and not (work_dir / SETTINGS_FILE).is_file():
        raise UserError(f"{npz_path} exists and has no settings record beside it ({settings_path.name}): it is "
                        "not the output of this sampler, so it is left alone; pass another --output, or move "
                        "the file away")
    if settings_path.exists() and not settings_path.is_file():
        raise UserError(f"the settings record {settings_path} exists and is not a file; pass another --output")
    if work_dir.exists() and not work_dir.is_dir():
        raise UserError(f"the work folder {work_dir} exists and is not a directory; pass another --output")
    png_dir = npz_path.with_suffix("")
    if save_png and png_dir.exists() and not png_dir.is_dir():
        raise UserError(f"the PNG folder of --save-png, {png_dir}, exists and is not a directory; pass another "
                        "--output")


# --- main --------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    settings = resolve_settings(args)
    if args.output is not None:  # checked in full before the model loads; a derived name once it is known
        check_output(Path(args.output), args.save_png)
    else:
        check_writable(Path(args.output_dir))
    rank, world_size, device = init_distributed()
    try:
        return sample(args, settings, rank, world_size, device)
    finally:
        close_distributed()


def build(args, settings, device):
    """Model, objective, decoder and the settings record, every mismatch reported before sampling."""
    model, loaded = load_model(args.ckpt, args.model, args.time_convention, args.weights)
    info = training_info(args.ckpt)
    objective = build_objective(loaded, info)
    fill_sampler(settings, objective, models.model_family(loaded.name))
    decoder = load_decoder(args.vae, info, device)
    image_size = check_compatible(loaded.model, decoder, args.image_size, settings["cfg_scale"])
    source = condition_source(args, settings, loaded, info, device)
    record = image_settings(args, settings, loaded, decoder, image_size, device, source)
    sample_shape = (loaded.model.in_channels, loaded.model.input_size, loaded.model.input_size)
    autocast = device.type == "cuda" and args.mixed_precision == "bf16"
    sample_batch = BatchSampler(model.to(device), sample_shape, objective, decoder, settings, device,
                                autocast, source)
    return sample_batch, loaded, record


def run_batches(sample_batch, batches, store, png_dir, rank, world_size):
    """Sample and store this process's batches; returns how many images it made."""
    made = sum(end - start for start, end in batches)
    # Rank 0's bar, scaled by the number of processes: an estimate of the whole run's progress.
    progress = tqdm(total=made, unit="img", unit_scale=world_size if world_size > 1 else False,
                    disable=rank != 0, dynamic_ncols=True, desc=f"sampling ({world_size} × rank 0)")
    for start, end in batches:
        images, records = sample_batch(start, end)
        if png_dir is not None:
            save_pngs(images, start, png_dir)
        store.write(start, images, records)  # after the PNGs: a finished shard implies its PNGs
        progress.update(end - start)
    progress.close()
    return made


def sample(args, settings, rank, world_size, device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    sample_batch, loaded, record = build(args, settings, device)
    npz_path = output_path(args, settings, loaded)
    check_output(npz_path, args.save_png)
    settings_path = npz_path.with_suffix(".json")
    check_settings(settings_path, record)
    store = ShardStore(npz_path.with_suffix(".work"), sample_batch.source.record_key)
    store.check_settings(record)
    if npz_path.is_file():
        if rank == 0:
            if not settings_path.is_file():  # killed after assembling: the work folder's record vouches for it
                write_settings(settings_path, record)
            if store.work_dir.is_dir():
                store.remove()
            print(f"{npz_path} is already complete")
        barrier()
        return {"npz": npz_path, "settings": record, "made": 0}

    png_dir = npz_path.with_suffix("") if args.save_png else None
    if rank == 0:
        for note in loaded.notes:
            print(f"{args.ckpt}: {note}")
        print(f"decoder: {sample_batch.decoder.name} ({sample_batch.decoder.source})")
        print(settings_line(record, settings_path), flush=True)
        for temp in temp_files(npz_path) + temp_files(settings_path):
            temp.unlink()  # what a run killed while writing them left
        store.prepare(record)
        if png_dir is not None:
            png_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    batches = plan_batches(store.finished(settings["num_samples"]), settings["per_proc_batch_size"])
    barrier()  # every process has listed the finished shards before any writes a new one

    # Batches are global index ranges dealt round-robin, so the images do not depend on world_size.
    start_time = time.perf_counter()
    made = run_batches(sample_batch, batches[rank::world_size], store, png_dir, rank, world_size)
    barrier()
    seconds = time.perf_counter() - start_time
    made = int(sum_over_processes(made, device))
    if rank == 0:
        store.assemble(settings["num_samples"], npz_path, sample_batch.source.extra_arrays)
        write_settings(settings_path, record)
        store.remove()
        processes = f"{world_size} process{'es' if world_size > 1 else ''}"
        print(f"sampled {made} images in {seconds:.1f} s: {made / max(seconds, 1e-9):.2f} images/s "
              f"over {processes} ({device.type})")
        print(f"wrote {npz_path} ({settings['num_samples']} images)")
    barrier()
    return {"npz": npz_path, "settings": record, "made": made, "seconds": seconds}


if __name__ == "__main__":
    run_cli(main)
