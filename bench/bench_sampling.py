"""Images/s of SiT sampling with a CFG guidance interval: skipping the unconditional pass outside the
interval (models.guided_model_fn, what sample_ddp.py runs) against computing both halves at every
step and mixing them only inside it (the public SiT/REPA/SRA samplers), in the same run.

Times the model and the sampler only: no VAE decoding (the GPU image has no diffusers), initialized
(not trained) weights, which cost the same. The SDE draws its noise from one generator per sample, as
in sample_ddp.py. Also times the per-index initial noise of sampling/seeds.py.

    python bench/bench_sampling.py                                        # CPU: small SiT, few steps
    python bench/bench_sampling.py --model SiT-XL/2 --batch-size 256 --steps 250 --device cuda --bf16
"""
import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from sampling.seeds import initial_noise, sampler_generators  # noqa: E402
from transport import FlowObjective  # noqa: E402

GUIDANCE_INTERVAL = (0.0, 0.7)  # SRA's 256 px evaluation (SPEC §5)
CFG_SCALE = 1.8  # SRA's 256 px evaluation (SPEC §5)
NUM_CLASSES = 1000  # ImageNet
WARMUP_STEPS = 2  # one short batch per variant first: one step outside the interval, one inside


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
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as sample_ddp.py on GPU)")
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
    from transport import SDE_LAST_STEP_TIME

    times = torch.linspace(1.0, SDE_LAST_STEP_TIME, steps, dtype=torch.float64).tolist()
    return sum(interval[0] <= t <= interval[1] for t in times) / steps


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = models.create_model(args.model, args.input_size, 4, NUM_CLASSES).to(device).eval()
    objective = FlowObjective()
    shape = (model.in_channels, args.input_size, args.input_size)

    initial_noise(0, [0], shape)  # the first call pays one-off import and allocation costs
    noise_start = time.perf_counter()
    z = initial_noise(0, range(args.batch_size), shape).to(device)  # (N, C, H, W)
    noise_seconds = time.perf_counter() - noise_start
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=torch.Generator().manual_seed(0))
    y = y.to(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    interval = tuple(args.guidance_interval)
    model_fns = {
        "skip the unconditional pass outside the interval": models.guided_model_fn(
            model, y, scale=args.cfg_scale, interval=interval),
        "both halves at every step (public samplers)": both_halves_model_fn(
            model, y, args.cfg_scale, interval),
    }
    for model_fn in model_fns.values():  # warm-up: kernel selection, allocator, caches
        sample_seconds(model_fn, objective, z, WARMUP_STEPS, autocast, device)
    seconds = dict.fromkeys(model_fns, 0.0)
    for _ in range(args.num_batches):  # alternate, so drifts in clock or load hit both alike
        for name, model_fn in model_fns.items():
            seconds[name] += sample_seconds(model_fn, objective, z, args.steps, autocast, device)
    images = args.batch_size * args.num_batches
    rates = {name: images / value for name, value in seconds.items()}
    for name, rate in rates.items():
        print(f"{name}: {rate:.3f} images/s ({seconds[name]:.1f} s for {images} images)")
    skip, both = rates.values()
    fraction = guided_fraction(args.steps, interval)
    expected = 2 / (1 + fraction)  # model images per step: 2N everywhere vs 2N inside, N outside
    print(f"speedup {skip / both:.2f}x (model work ratio {expected:.2f}x: {fraction:.0%} of steps guided)")
    seconds_per_batch = args.batch_size / skip
    print(f"per-index noise: {noise_seconds * 1e3:.1f} ms per batch of {args.batch_size}, "
          f"{noise_seconds / seconds_per_batch:.2%} of its sampling time")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"device: {where}, torch {torch.__version__}, {args.model}, batch {args.batch_size}, "
          f"{args.steps} SDE steps, CFG {args.cfg_scale} on {list(interval)}, bf16 {args.bf16}")


if __name__ == "__main__":
    main()
