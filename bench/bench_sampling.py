"""Images/s of SiT sampling with CFG on a guidance interval: this project's sampler against the public
releases' sampler settings, measured in the same run, and the time to draw an evaluation's 50K samples.

Variants (--variants), all with the same weights (one state dict), the same initial and SDE noise, and the
same SDE sampler, timed batch after batch in turn so that drifts in clock or load touch each alike:
  ours          models.guided_model_fn (what sample_ddp.py runs): the unconditional pass skipped outside
                the interval; SDPA attention; bf16 autocast with --bf16 (as sample_ddp.py on a GPU)
  both-halves   the public samplers' guidance (conditional and unconditional halves at every step, mixed
                only inside the interval) at ours' precision and attention: the interval's effect alone
  release       the release's sampler settings: both halves at every step, fp32, the explicit attention
                (softmax(QKᵀ/√d)·V as separate ops, a model built with fused_attn=False)

Initialized (not trained) weights, which cost the same. The SDE draws its noise from one generator per
sample as in sample_ddp.py, for every variant (the releases draw it with one call per step for the batch).
On a GPU, fp32 matmuls may use TF32 for every variant, as the DiT/SiT releases' sample_ddp.py --tf32 default.
The 50K-sample time is the total over the measured rate, on one device; VAE decoding is excluded unless
--decode measures it: an AutoencoderKL of SD-VAE's architecture (stabilityai/sd-vae-ft-ema's config,
random weights, no download; decoding costs the same whatever the weights) decoding the batch in fp32 in
chunks of 64, as sample_ddp.py. Also times the per-index initial noise of sampling/seeds.py.

    python bench/bench_sampling.py                                        # CPU: small SiT, few steps
    python bench/bench_sampling.py --decode --batch-size 2 --steps 4 --input-size 8   # CPU, with decoding
    python bench/bench_sampling.py --model SiT-XL/2 --batch-size 256 --steps 250 --device cuda --bf16 \\
        --num-batches 1 --decode --out sampling.jsonl   # the SRA evaluation's setting, on one GPU
"""
import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from preprocessing.vae import SD_VAE_SCALING  # noqa: E402
from sampling.seeds import initial_noise, sampler_generators  # noqa: E402
from transport import SDE_LAST_STEP_TIME, FlowObjective  # noqa: E402

GUIDANCE_INTERVAL = (0.0, 0.7)  # SRA's 256 px evaluation (SPEC §5)
CFG_SCALE = 1.8  # SRA's 256 px evaluation (SPEC §5)
NUM_CLASSES = 1000  # ImageNet
WARMUP_STEPS = 2  # one short batch per variant first: one step outside the interval, one inside
TOTAL_SAMPLES = 50_000  # an FID evaluation's sample count (SPEC §5)
VARIANTS = ("ours", "both-halves", "release")
# stabilityai/sd-vae-ft-ema's config.json: the SD-VAE decoder of the DiT, SiT, REPA and SRA evaluations
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SD_VAE_SCALING.scale,
}
VAE_BATCH_SIZE = 64  # images per decoder call, as sample_ddp.py's default --vae-batch-size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SiT-S/4", choices=models.MODEL_NAMES)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32: 256 px images)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="SDE steps (the paper: 250)")
    parser.add_argument("--num-batches", type=int, default=3, help="timed batches per variant")
    parser.add_argument("--cfg-scale", type=float, default=CFG_SCALE)
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=GUIDANCE_INTERVAL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast for ours and both-halves (as sample_ddp.py on GPU); release stays fp32")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--total-samples", type=int, default=TOTAL_SAMPLES,
                        help="the sample count whose time is extrapolated from the measured rate")
    parser.add_argument("--decode", action="store_true",
                        help="also time SD-VAE decoding (random weights; needs diffusers) and add it")
    parser.add_argument("--out", type=Path, help="append the results as JSON lines here")
    return parser.parse_args(argv)


def both_halves_model_fn(model, y, scale, interval):
    """The public samplers: conditional and unconditional halves at every step, mixed only inside."""
    low, high = interval

    def model_fn(x, t_model, t_frac):
        inside = low <= t_frac <= high
        return models.cfg_forward(model, x.float(), t_model, y, scale if inside else 1.0)

    return model_fn


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_seconds(model_fn, objective, z, steps, autocast, device):
    """One batch as sample_ddp.py samples it: one SDE noise generator per sample."""
    generators = sampler_generators(0, range(len(z)), device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast():
        objective.sample(model_fn, z, num_steps=steps, generator=generators)
    synchronize(device)
    return time.perf_counter() - start


def guided_fraction(steps, interval):
    """Fraction of SDE model calls inside the interval: times linspace(1, 0.04, steps)."""
    times = torch.linspace(1.0, SDE_LAST_STEP_TIME, steps, dtype=torch.float64).tolist()
    return sum(interval[0] <= t <= interval[1] for t in times) / steps


def variant_settings(args, model, release_model, y, device):
    """{variant: (model_fn, autocast factory, description)} for the selected variants."""
    interval = tuple(args.guidance_interval)

    def bf16():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    ours_autocast = bf16 if args.bf16 else contextlib.nullcontext
    precision = "bf16" if args.bf16 else "fp32"
    settings = {
        "ours": (models.guided_model_fn(model, y, scale=args.cfg_scale, interval=interval), ours_autocast,
                 {"guidance": "skip the unconditional pass outside the interval", "precision": precision,
                  "attention": "sdpa"}),
        "both-halves": (both_halves_model_fn(model, y, args.cfg_scale, interval), ours_autocast,
                        {"guidance": "both halves at every step", "precision": precision, "attention": "sdpa"}),
        "release": (both_halves_model_fn(release_model, y, args.cfg_scale, interval), contextlib.nullcontext,
                    {"guidance": "both halves at every step", "precision": "fp32", "attention": "explicit"}),
    }
    return {name: settings[name] for name in args.variants}


def sd_vae():
    """SD-VAE's architecture with random weights, or None where diffusers is not installed."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return None
    return AutoencoderKL.from_config(SD_VAE_CONFIG).eval().requires_grad_(False)


def decode_seconds(vae, latents, device, repeats):
    """Seconds to decode the batch's latents (model space) in fp32 chunks, as sample_ddp.py, per batch."""
    scaling = SD_VAE_SCALING

    def decode():
        with torch.no_grad():
            for chunk in latents.split(VAE_BATCH_SIZE):
                vae.decode(chunk / scaling.scale + scaling.shift)

    with torch.no_grad():  # warm-up: kernel selection, allocator
        vae.decode(latents[:1] / scaling.scale + scaling.shift)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        decode()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def duration(seconds):
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = models.create_model(args.model, args.input_size, 4, NUM_CLASSES).to(device).eval()
    release_model = None
    if "release" in args.variants:
        release_model = models.create_model(args.model, args.input_size, 4, NUM_CLASSES, fused_attn=False)
        release_model.load_state_dict(model.state_dict(), strict=True)
        release_model = release_model.to(device).eval()
    objective = FlowObjective()
    shape = (model.in_channels, args.input_size, args.input_size)

    initial_noise(0, [0], shape)  # the first call pays one-off import and allocation costs
    noise_start = time.perf_counter()
    z = initial_noise(0, range(args.batch_size), shape).to(device)  # (N, C, H, W)
    noise_seconds = time.perf_counter() - noise_start
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=torch.Generator().manual_seed(0))
    y = y.to(device)

    interval = tuple(args.guidance_interval)
    variants = variant_settings(args, model, release_model, y, device)
    for model_fn, autocast, _ in variants.values():  # warm-up: kernel selection, allocator, caches
        sample_seconds(model_fn, objective, z, WARMUP_STEPS, autocast, device)
    seconds = dict.fromkeys(variants, 0.0)
    for _ in range(args.num_batches):  # alternate, so drifts in clock or load hit every variant alike
        for name, (model_fn, autocast, _) in variants.items():
            seconds[name] += sample_seconds(model_fn, objective, z, args.steps, autocast, device)
    images = args.batch_size * args.num_batches
    rates = {name: images / value for name, value in seconds.items()}

    decode_rate, decode_note = None, "VAE decoding excluded (not measured; --decode measures it)"
    if args.decode:
        vae = sd_vae()
        if vae is None:
            decode_note = "VAE decoding excluded: diffusers is not installed"
        else:
            # Decoding costs the same whatever the latents' values: the initial noise stands in for samples.
            decode_rate = args.batch_size / decode_seconds(vae.to(device), z, device, args.num_batches)
            decode_note = (f"VAE decoding included: SD-VAE architecture, random weights, fp32, chunks of "
                           f"{VAE_BATCH_SIZE}: {decode_rate:.3f} images/s")
            del vae

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    total = args.total_samples
    print(f"device: {where}, torch {torch.__version__}, {args.model}, batch {args.batch_size}, {args.steps} SDE "
          f"steps, CFG {args.cfg_scale} on {list(interval)}, {args.num_batches} batches per variant")
    decode_total = total / decode_rate if decode_rate else None
    print(f"{'variant':<13}{'guidance':<52}{'precision':<11}{'attention':<11}{'images/s':>10}"
          f"{f'{total:,} samples' + (' + decode' if decode_total else ''):>26}")
    rows = []
    for name, (_, _, described) in variants.items():
        sampling_total = total / rates[name]
        end_to_end = sampling_total + (decode_total or 0.0)
        print(f"{name:<13}{described['guidance']:<52}{described['precision']:<11}{described['attention']:<11}"
              f"{rates[name]:10.3f}{duration(end_to_end):>26}")
        rows.append({"variant": name, **described, "images_per_s": rates[name], "seconds": seconds[name],
                     "images": images, "total_samples": total, "sampling_s": sampling_total,
                     "decode_s": decode_total, "end_to_end_s": end_to_end})
    print(f"{total:,}-sample times: the model and sampler at the measured rate on this one device; {decode_note}")

    fraction = guided_fraction(args.steps, interval)
    expected = 2 / (1 + fraction)  # model images per step: 2N everywhere vs 2N inside, N outside
    if "ours" in rates and "both-halves" in rates:
        print(f"ours vs both-halves: {rates['ours'] / rates['both-halves']:.2f}x (model work ratio "
              f"{expected:.2f}x: {fraction:.0%} of steps guided)")
    if "ours" in rates and "release" in rates:
        print(f"ours vs release: {rates['ours'] / rates['release']:.2f}x")
    seconds_per_batch = args.batch_size / next(iter(rates.values()))
    print(f"per-index noise: {noise_seconds * 1e3:.1f} ms per batch of {args.batch_size}, "
          f"{noise_seconds / seconds_per_batch:.2%} of its sampling time ({next(iter(rates))})")
    if args.out:
        common = {
            "device": where, "torch": torch.__version__, "model": args.model, "input_size": args.input_size,
            "batch_size": args.batch_size, "steps": args.steps, "num_batches": args.num_batches,
            "cfg_scale": args.cfg_scale, "guidance_interval": list(interval), "guided_fraction": fraction,
            "model_work_ratio": expected, "decode_images_per_s": decode_rate, "decode_note": decode_note,
            "noise_s_per_batch": noise_seconds, "tf32": device.type == "cuda",
        }
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps({**row, **common}) + "\n")


if __name__ == "__main__":
    main()
