"""Training-step cost of SRA against the plain baseline, measured in one run (issue: SRA and the loop).

Variants, all with the same model, batch, precision and optimizer, through train.py's own `train_step`:
  baseline        --sra off
  sra             this project: teacher runs k_T blocks only, under the training autocast
  sra-full        teacher runs every block and the final layer (what the release computes)
  sra-full-fp32   as sra-full, and in fp32 (the release's teacher exactly)

    python bench/bench_train_step.py --model SiT-S/2 --input-size 16 --batch-size 8 --rounds 5   # CPU, fp32
    python bench/bench_train_step.py --model SiT-XL/2 --batch-size 32 --precision bf16 --compile
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
import sra  # noqa: E402
from diffusion import create_objective  # noqa: E402
from training.step import train_step  # noqa: E402

VARIANTS = ("baseline", "sra", "sra-full", "sra-full-fp32")
PIXEL_META = {"kind": "pixels"}  # the bench feeds ready model inputs: no latent sampling


class FullDepthTeacher:
    """The release's teacher: a full forward pass, block k_T's tokens taken on the way."""

    def __init__(self, model, fp32):
        self.model, self.fp32 = model, fp32

    def forward_features(self, x, t, y, depth):
        if not self.fp32:  # the training step's own autocast applies
            return self.model.forward_with_features(x, t, y, depth)[1]
        with torch.autocast(x.device.type, enabled=False):
            return self.model.forward_with_features(x.float(), t, y, depth)[1]


class BenchAccelerator:
    """The three things `train_step` asks of accelerate, for a single process (no launcher needed)."""

    def __init__(self, device, precision):
        self.device = torch.device(device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def no_sync(self, model):
        raise AssertionError("the bench runs without gradient accumulation")

    def backward(self, loss):
        loss.backward()


def build(variant, args):
    backbone = models.create_model(args.model, args.input_size, 4, 1000)
    student_depth, teacher_depth = sra.default_block_pair(args.model)
    use_sra = variant != "baseline"
    head = sra.ProjectionHead(backbone.hidden_size) if use_sra else None
    student = sra.Student(backbone, head, student_depth if use_sra else None).to(args.device).train()
    ema = sra.EMATeacher(backbone.to(args.device))
    objective = create_objective("flow")
    config = sra.SRAConfig(student_depth, teacher_depth, sra.T_MAX) if use_sra else None
    loss_fn = sra.TrainingLoss(objective, 0.1, 1000, config)
    teacher = (
        ema.model if variant in ("baseline", "sra") else FullDepthTeacher(ema.model, variant.endswith("fp32"))
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    if args.compile:
        student = torch.compile(student)
        if isinstance(teacher, FullDepthTeacher):
            teacher.model.forward_with_features = torch.compile(teacher.model.forward_with_features)
        else:
            teacher.forward_features = torch.compile(teacher.forward_features)
    return student, ema, teacher, loss_fn, optimizer, (student_depth, teacher_depth)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_stepper(variant, args):
    """A function that runs one full training step of `variant`, and its block pair."""
    student, ema, teacher, loss_fn, optimizer, pair = build(variant, args)
    accelerator = BenchAccelerator(args.device, args.precision)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 4, args.input_size, args.input_size, generator=generator).to(args.device)
    y = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(args.device)
    config = {"grad_accum_steps": 1, "max_grad_norm": 1.0}
    base = student._orig_mod if args.compile else student

    def step():
        _, _, finite = train_step(
            [(x, y)], PIXEL_META, loss_fn, student, teacher, optimizer, None, config, 0.2, accelerator
        )
        ema.update(base.backbone, apply=finite)

    return step, pair


def timed(step, count, device):
    """Seconds of each of `count` steps, the device synchronized after each."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def warm_up(step, args):
    start = time.perf_counter()
    timed(step, args.warmup, args.device)
    return time.perf_counter() - start


def measure(variant, args):
    """One variant alone: its step times and its peak memory (GPU)."""
    step, pair = make_stepper(variant, args)
    warmup_s = warm_up(step, args)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, args.steps, args.device)
    result = {"variant": variant, "median_step_s": statistics.median(times), "warmup_s": warmup_s,
              "block_pair": pair}
    if torch.device(args.device).type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def measure_interleaved(args):
    """All variants built at once and timed in alternating rounds, so that a load that comes and goes on
    a shared machine touches every variant alike (no memory numbers: the models share the device)."""
    steppers = {variant: make_stepper(variant, args) for variant in args.variants}
    warmup_s = {variant: warm_up(step, args) for variant, (step, _) in steppers.items()}
    times = {variant: [] for variant in steppers}
    per_round = max(args.steps // args.rounds, 1)
    for _ in range(args.rounds):
        for variant, (step, _) in steppers.items():
            times[variant] += timed(step, per_round, args.device)
    return [{"variant": variant, "median_step_s": statistics.median(times[variant]),
             "warmup_s": warmup_s[variant], "block_pair": steppers[variant][1]} for variant in steppers]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SiT-S/2", choices=models.MODEL_NAMES)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="> 1: build every variant at once and alternate them in rounds (shared CPUs)")
    parser.add_argument("--out", type=Path, help="append the results as JSON lines here")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    results = measure_interleaved(args) if args.rounds > 1 else []
    for variant in args.variants if args.rounds == 1 else ():
        results.append(measure(variant, args))
        gc.collect()  # the last variant's model and optimizer are gone before the next is built
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    baseline = next((r for r in results if r["variant"] == "baseline"), None)
    setting = (
        f"{args.model} input {args.input_size} batch {args.batch_size} {args.precision} "
        f"{'compiled' if args.compile else 'eager'} on {args.device}"
    )
    print(f"# {setting}, torch {torch.__version__}")
    print(f"{'variant':<15}{'step ms':>10}{'vs base':>9}{'peak GiB':>10}{'vs base':>9}")
    for r in results:
        time_ratio = r["median_step_s"] / baseline["median_step_s"] if baseline else float("nan")
        mem = r.get("peak_mem_gib")
        mem_ratio = mem / baseline["peak_mem_gib"] if baseline and mem else float("nan")
        mem_text = f"{mem:10.2f}" if mem else f"{'-':>10}"
        print(
            f"{r['variant']:<15}{1000 * r['median_step_s']:10.1f}{time_ratio:9.3f}{mem_text}{mem_ratio:9.3f}"
        )
        r.update(setting=setting, time_ratio=time_ratio, mem_ratio=mem_ratio, torch=torch.__version__)
    if args.out:
        with args.out.open("a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
