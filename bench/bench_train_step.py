"""Training-step cost of each guidance method against the plain baseline, measured in one run.

Variants, all with the same model, batch, precision and optimizer, through train.py's own `train_step`:
  none            --guidance none (the baseline)
  sra             --guidance sra: the teacher runs k_T blocks only, under the training autocast
  sra-full        SRA with the teacher run through every block and the final layer (what the release computes)
  sra-full-fp32   as sra-full, and in fp32 (the release's teacher exactly)
  repa            --guidance repa: DINOv2 ViT-B/14 (REPA's default; random weights, same cost) on the clean
                  images, REPA's projector, −cos
  sra-dts-as      the release's SiT-SRA_DTS_AS setting (preset sit-b2-sra-dts-as): token groups of 1/4 and 3/4,
                  dual-time scheduling, attention separation, the teacher at each group's t − Δ behind the
                  same groups; the conditioning computed once per group and handed to its tokens
  sra-dts-as-dense  as sra-dts-as with the adaLN conditioning computed for every token, as the release's
                  model does (the same numbers at T/G times the adaLN cost)

Step times come from one process in which all variants are built and timed in alternating rounds
(--rounds), so that a load that comes and goes on a shared machine touches every variant alike. Peak
memory (--memory) comes from one fresh subprocess per variant: CUDA's max allocated bytes, or on the CPU
the process's peak resident set size (which includes the ~0.3 GB of Python and torch themselves).

    python bench/bench_train_step.py --model SiT-B/2 --input-size 8 --batch-size 4 --rounds 5 --memory   # CPU
    python bench/bench_train_step.py --model SiT-XL/2 --batch-size 32 --precision bf16 --memory
    python bench/bench_train_step.py --model SiT-B/2 --input-size 16 --batch-size 8 --variants sra sra-dts-as \
        sra-dts-as-dense --memory   # SRA against the release's newest setting, same model and batch
    python bench/bench_train_step.py --model MMDiT-D24/2 --batch-size 32 --precision bf16 --variants none sra \
        sra-full --memory   # text to image: MMDiT on 77 CLIP tokens (random contexts of CLIP ViT-L/14's width)
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from conditioning import CLASS, Condition  # noqa: E402
from configs.presets import PRESETS  # noqa: E402
from dts import TokenGrouping, TokenGroupsConfig  # noqa: E402
from guidance import GuidanceContext, Student, TrainingLoss  # noqa: E402
from objectives.registry import objective_for_model  # noqa: E402
from repa import REPA, REPAConfig  # noqa: E402
from repa.encoder import ENCODERS, ImageEncoder  # noqa: E402
from sra import SRA, SRAConfig  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.step import train_step  # noqa: E402

VARIANTS = ("none", "sra", "sra-full", "sra-full-fp32", "repa", "sra-dts-as", "sra-dts-as-dense")
PIXEL_META = {"kind": "pixels"}  # the bench feeds ready model inputs: no latent sampling
LATENT_DOWNSAMPLE = 8  # SD-VAE: the clean images REPA's encoder sees are 8× the latent side
NUM_CLASSES = 1000  # ImageNet
CONTEXT_LENGTH = 77  # CLIP's tokens per caption (text models)


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


def per_token_conditioning(model):
    """The release's cost: the per-group conditioning spread to every token before the adaLN layers."""
    plain_embed = model._embed

    def embed(x, t, y, groups):
        tokens, c, per_group, mask = plain_embed(x, t, y, groups)
        if per_group is not None:
            c = per_group.per_token(c)
        return tokens, c, None, mask

    model._embed = embed
    return model


def release_dts_settings():
    """The group flags and SRA flags of the preset sit-b2-sra-dts-as."""
    preset = PRESETS["sit-b2-sra-dts-as"]
    groups = TokenGroupsConfig(**{f: preset[f] for f in ("mask_ratio", "dual_time_scheduling",
                                                         "attention_separation")})
    sra = SRAConfig(**{f: preset[f] for f in ("teacher_t", "teacher_mask", "align_distance", "align_weight")})
    return groups, sra


def random_encoder(grid):
    """REPA's default encoder architecture with random weights: the cost of the real one, no download."""
    import timm

    vit = timm.create_model(ENCODERS["dinov2-vit-b"].split(".")[0], pretrained=False, num_classes=0,
                            img_size=grid * 14)
    return ImageEncoder(vit, grid)


def condition_of(model_name):
    """The bench's condition: ImageNet's classes, or CLIP ViT-L/14-wide contexts with a zero null."""
    if models.family_of(model_name).condition == CLASS:
        return Condition.classes(NUM_CLASSES)
    return Condition.text(torch.zeros(CONTEXT_LENGTH, models.mmdit.CONTEXT_DIM))


def random_conditions(condition, n, generator):
    if condition.kind == CLASS:
        return torch.randint(0, condition.num_classes, (n,), generator=generator)
    return torch.randn(n, *condition.null.shape, generator=generator)


def build(variant, args):
    condition = condition_of(args.model)
    backbone = models.create_model(args.model, args.input_size, 4, **condition.model_options(0.1))
    ema = EMA(backbone.to(args.device))
    objective = objective_for_model(args.model)
    context = GuidanceContext(objective, ema.model, backbone, torch.device(args.device))
    guidance = grouping = None
    if variant.startswith("sra-dts-as"):
        groups, sra_config = release_dts_settings()
        guidance = SRA(sra_config.resolved_for(args.model, backbone.depth), context)
        grouping = TokenGrouping(groups, objective, backbone.num_patches, backbone.patch_size)
        if variant.endswith("dense"):
            per_token_conditioning(backbone)
            per_token_conditioning(ema.model)
    elif variant.startswith("sra"):
        guidance = SRA(SRAConfig().resolved_for(args.model, backbone.depth), context)
        if variant != "sra":
            guidance.teacher = FullDepthTeacher(ema.model, variant.endswith("fp32"))
    elif variant == "repa":
        grid = round(backbone.num_patches**0.5)
        guidance = REPA(REPAConfig().resolved_for(args.model, backbone.depth), context, random_encoder(grid))
    head = guidance.build_head(backbone.hidden_size) if guidance is not None else None
    student = Student(backbone, head, guidance.student_depth if guidance else None).to(args.device).train()
    loss_fn = TrainingLoss(objective, 0.1, condition.to(args.device), guidance, grouping)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    trained = student
    if args.compile:
        trained = torch.compile(student)
        teacher = getattr(guidance, "teacher", None)
        if isinstance(teacher, FullDepthTeacher):
            teacher.model.forward_with_features = torch.compile(teacher.model.forward_with_features)
        elif teacher is not None:
            teacher.forward_features = torch.compile(teacher.forward_features)
    pair = (guidance.student_depth, getattr(guidance.config, "teacher_depth", None)) if guidance else None
    return student, trained, ema, loss_fn, optimizer, pair


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_stepper(variant, args):
    """A function that runs one full training step of `variant`, and its block pair."""
    student, trained, ema, loss_fn, optimizer, pair = build(variant, args)
    accelerator = BenchAccelerator(args.device, args.precision)
    generator = torch.Generator().manual_seed(0)
    n, side = args.batch_size, args.input_size
    x = torch.randn(n, 4, side, side, generator=generator).to(args.device)
    y = random_conditions(condition_of(args.model), n, generator).to(args.device)
    images = torch.randint(0, 256, (n, 3, side * LATENT_DOWNSAMPLE, side * LATENT_DOWNSAMPLE),
                           generator=generator, dtype=torch.uint8).to(args.device)
    batch = (x, y, images) if variant == "repa" else (x, y)

    def step():
        _, _, finite = train_step([batch], PIXEL_META, loss_fn, trained, optimizer, None, accelerator, 0.2, 1.0)
        ema.update(student.backbone, apply=finite)

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


def measure_interleaved(args):
    steppers = {variant: make_stepper(variant, args) for variant in args.variants}
    for step, _ in steppers.values():
        timed(step, args.warmup, args.device)
    times = {variant: [] for variant in steppers}
    per_round = max(args.steps // args.rounds, 1)
    for _ in range(args.rounds):
        for variant, (step, _) in steppers.items():
            times[variant] += timed(step, per_round, args.device)
    return [{"variant": variant, "median_step_s": statistics.median(times[variant]),
             "block_pair": steppers[variant][1]} for variant in steppers]


def peak_memory(args):
    """This process alone runs one variant; its peak memory in GiB."""
    (variant,) = args.variants
    step, _ = make_stepper(variant, args)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed(step, args.warmup + 2, args.device)
    if torch.device(args.device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    # VmHWM, this process's own peak resident set (ru_maxrss would carry the parent's peak across exec).
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20  # kB


def memory_in_subprocesses(args, argv):
    """Peak memory of each variant, each in a fresh process (same flags, one variant)."""
    flags = [a for a in argv if a not in ("--memory",)]
    peaks = {}
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, *flags, "--variants", variant, "--peak-memory-only"],
                             check=True, capture_output=True, text=True)
        peaks[variant] = float(out.stdout.strip().splitlines()[-1])
        gc.collect()
    return peaks


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-B/2", choices=models.MODEL_NAMES)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4, help="alternate the variants in this many rounds")
    parser.add_argument("--memory", action="store_true", help="also measure each variant's peak memory alone")
    parser.add_argument("--peak-memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="append the results as JSON lines here")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    if args.peak_memory_only:
        print(peak_memory(args))
        return
    results = measure_interleaved(args)
    peaks = memory_in_subprocesses(args, argv) if args.memory else {}
    baseline = next((r for r in results if r["variant"] == "none"), None)
    setting = (f"{args.model} input {args.input_size} batch {args.batch_size} {args.precision} "
               f"{'compiled' if args.compile else 'eager'} on {args.device}")
    unit = "GiB" if torch.device(args.device).type == "cuda" else "GiB RSS"
    print(f"# {setting}, torch {torch.__version__}, {args.rounds} rounds of {args.steps // args.rounds} steps")
    print(f"{'variant':<18}{'step ms':>10}{'vs none':>9}{'peak ' + unit:>14}{'vs none':>9}")
    for r in results:
        time_ratio = r["median_step_s"] / baseline["median_step_s"] if baseline else float("nan")
        mem = peaks.get(r["variant"])
        mem_ratio = mem / peaks["none"] if mem and peaks.get("none") else float("nan")
        mem_text = f"{mem:14.2f}" if mem else f"{'-':>14}"
        print(f"{r['variant']:<18}{1000 * r['median_step_s']:10.1f}{time_ratio:9.3f}{mem_text}{mem_ratio:9.3f}")
        r.update(setting=setting, time_ratio=time_ratio, peak_mem_gib=mem, mem_ratio=mem_ratio,
                 torch=torch.__version__)
    if args.out:
        with args.out.open("a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
