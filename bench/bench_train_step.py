"""Training-step cost of each guidance method against the plain baseline, measured in one run.

Variants, all with the same model, batch, precision and optimizer, through train.py's own `train_step`:
  none            --guidance none (the baseline)
  sra             --guidance sra: the teacher runs k_T blocks only, under the training autocast
  sra-full        SRA with the teacher run through every block and the final layer (what the release computes)
  sra-full-fp32   as sra-full, and in fp32 (the release's teacher exactly)
  sra-fp8         as sra with --teacher-precision fp8: the teacher's token-wise matmuls in FP8 with row-wise
                  scales (models/fp8.py; a Hopper GPU, or the CPU's kernel for a smoke run only)
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
    python bench/bench_train_step.py --model SiT-XL/2 --precision bf16 --variants none --batch-sizes 32 64 128 256 \
        --compile-mode max-autotune-no-cudagraphs   # MFU against the batch, one process, batch after batch
    python bench/bench_train_step.py --model SiT-XL/2 --precision bf16 --variants none --channels-last \
        --compile-mode reduce-overhead   # CUDA graphs; the patch embedding's convolution in NHWC

FLOPs (models/flops.py: matmuls at 2·M·K·N, the attention's QKᵀ and AV included): the model FLOPs of a
step are batch × 3 × the backbone's forward FLOPs (backward = 2 × forward, the PaLM/Chinchilla convention),
the same for every variant, so that variants compare by time alone (the token-group variants' conditioning,
per group or per token, counted once per image as the baseline's). What a guidance method adds is listed
apart, as method FLOPs: the teacher's forward (no backward; k_T blocks, or the full model for sra-full) and
the head's forward and backward; REPA's encoder is not counted. MFU = model FLOPs per second ÷ the GPU's
dense peak at the step's matmul precision (bench/hardware.py; fp32 with TF32 at the TF32 rate); "-" where
the peak is unknown (the CPU, GPUs not in the table).

--batch-sizes measures each batch size in turn in this process (the models rebuilt, memory and compile
caches freed in between); a batch size that runs out of GPU memory is recorded as "oom" and the sweep goes
on. The variants of a batch size are built together, so "oom" says that together they did not fit: sweep one
variant at a time for each one's limit. --channels-last stores the input latents and the patch-embedding
convolution's weights (student and EMA) in channels_last (NHWC) memory format.

--compile-mode compiles the student (and the teacher's forward) with that torch.compile mode; it implies
--compile. reduce-overhead replays CUDA graphs: the step holds no output of one step into the next (each
step's loss and prediction are consumed in the step), the parameters and the EMA's are updated in place and
keep their addresses, and the inputs drawn anew every step (x_t, t, the dropped labels) are copied into
the graph's static inputs at each replay, a copy that is part of the measured time. The teacher's graph
(no grad) runs between the student's forward and backward graphs in the same order every step, one path
of a CUDA graph tree. Graphs are recorded on the second call of each, so --warmup must be 2 or more (the
default 3 is). Where inductor cannot graph a part (CPU tensors, mutated inputs) it runs that part without
CUDA graphs and says so in a warning. This reasoning has not yet been checked on a GPU.
"""

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from bench.hardware import device_name, matmul_precision, peak_tflops  # noqa: E402
from conditioning import CLASS, Condition  # noqa: E402
from configs.presets import PRESETS  # noqa: E402
from dts import TokenGrouping, TokenGroupsConfig  # noqa: E402
from guidance import GuidanceContext, Student, TrainingLoss  # noqa: E402
from models.flops import forward_flops, matmul_flops, training_step_flops  # noqa: E402
from objectives.registry import objective_for_model  # noqa: E402
from repa import REPA, REPAConfig  # noqa: E402
from repa.encoder import ENCODERS, ImageEncoder  # noqa: E402
from sra import SRA, SRAConfig  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.step import train_step  # noqa: E402

VARIANTS = ("none", "sra", "sra-full", "sra-full-fp32", "sra-fp8", "repa", "sra-dts-as", "sra-dts-as-dense")
PIXEL_META = {"kind": "pixels"}  # the bench feeds ready model inputs: no latent sampling
LATENT_DOWNSAMPLE = 8  # SD-VAE: the clean images REPA's encoder sees are 8× the latent side
NUM_CLASSES = 1000  # ImageNet
CONTEXT_LENGTH = 77  # CLIP's tokens per caption (text models)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
FLOP_CONVENTION = ("model FLOPs per step = batch x 3 x the backbone's forward FLOPs (models/flops.py: matmuls "
                   "at 2*M*K*N, attention's QK^T and AV included; backward = 2 x forward), the same for every "
                   "variant; method FLOPs apart: the teacher's forward (no backward) and the head's forward and "
                   "backward (REPA's encoder not counted); MFU = model FLOP/s / the dense peak at the step's "
                   "matmul precision")


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


def context_length(model_name):
    return CONTEXT_LENGTH if models.family_of(model_name).condition != CLASS else None


def method_flops(variant, backbone, guidance, head, args):
    """Per step, what the method computes beyond the backbone's training step: {part: FLOPs}, None for a
    part not counted."""
    n, length = args.batch_size, context_length(args.model)
    parts = {}
    if isinstance(guidance, SRA):
        depth = None if variant.startswith("sra-full") else guidance.config.teacher_depth
        parts["teacher"] = forward_flops(backbone, n, depth, length)
    if head is not None:  # its linear layers on the student's tokens, trained
        per_token = sum(matmul_flops(1, layer.in_features, layer.out_features)
                        for layer in head.modules() if isinstance(layer, nn.Linear))
        parts["head"] = training_step_flops(n * backbone.num_patches * per_token)
    if variant == "repa":
        parts["encoder"] = None
    return parts


def build(variant, args):
    condition = condition_of(args.model)
    backbone = models.create_model(args.model, args.input_size, 4, **condition.model_options(0.1))
    if args.channels_last:  # copied into the EMA as it is
        backbone.x_embedder.to(memory_format=torch.channels_last)
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
    elif variant == "sra-fp8":
        config = SRAConfig(teacher_precision="fp8").resolved_for(args.model, backbone.depth)
        if torch.device(args.device).type == "cpu":  # the CPU's _scaled_mm: a smoke run of the path, no speed
            with mock.patch("sra.method.fp8_unsupported", return_value=None):
                guidance = SRA(config, context)
        else:
            guidance = SRA(config, context)
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
        mode = args.compile_mode or "default"
        trained = torch.compile(student, mode=mode)
        teacher = getattr(guidance, "teacher", None)
        if isinstance(teacher, FullDepthTeacher):
            teacher.model.forward_with_features = torch.compile(teacher.model.forward_with_features, mode=mode)
        elif teacher is not None:
            teacher.forward_features = torch.compile(teacher.forward_features, mode=mode)
    info = {
        "block_pair": (guidance.student_depth, getattr(guidance.config, "teacher_depth", None)) if guidance else None,
        "model_flops_per_step": args.batch_size * training_step_flops(
            forward_flops(backbone, context_length=context_length(args.model))),
        "method_flops_per_step": method_flops(variant, backbone, guidance, head, args),
    }
    return student, trained, ema, loss_fn, optimizer, info


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_stepper(variant, args):
    """A function that runs one full training step of `variant`, and what build() says of it (block pair,
    FLOPs)."""
    student, trained, ema, loss_fn, optimizer, info = build(variant, args)
    accelerator = BenchAccelerator(args.device, args.precision)
    generator = torch.Generator().manual_seed(0)
    n, side = args.batch_size, args.input_size
    x = torch.randn(n, 4, side, side, generator=generator).to(args.device)
    if args.channels_last:  # x0 is x itself (pixel data), and x_t follows its layout
        x = x.contiguous(memory_format=torch.channels_last)
    y = random_conditions(condition_of(args.model), n, generator).to(args.device)
    images = torch.randint(0, 256, (n, 3, side * LATENT_DOWNSAMPLE, side * LATENT_DOWNSAMPLE),
                           generator=generator, dtype=torch.uint8).to(args.device)
    batch = (x, y, images) if variant == "repa" else (x, y)

    def step():
        _, _, finite = train_step([batch], PIXEL_META, loss_fn, trained, optimizer, None, accelerator, 0.2, 1.0)
        ema.update(student.backbone, apply=finite)

    return step, info


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
    return [{"variant": variant, "median_step_s": statistics.median(times[variant]), **steppers[variant][1]}
            for variant in steppers]


def release_memory(args):
    """Free what one batch size's models, optimizers and compiled graphs hold, before the next."""
    if args.compile:
        torch._dynamo.reset()  # its caches hold the compiled modules (and the CUDA graph trees their pools)
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()


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


def single_run_flags(argv):
    """argv without --memory and --batch-sizes (with its values): the flags of one variant's memory run."""
    flags, in_sweep = [], False
    for arg in argv:
        if arg.startswith("--"):
            in_sweep = arg == "--batch-sizes"
            if in_sweep or arg == "--memory" or arg.startswith("--batch-sizes="):
                continue
        elif in_sweep:
            continue
        flags.append(arg)
    return flags


def memory_in_subprocesses(args, argv):
    """Peak memory of each variant, each in a fresh process (same flags, one variant, this batch size):
    GiB, or "oom"."""
    flags = single_run_flags(argv)
    peaks = {}
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, *flags, "--batch-size", str(args.batch_size),
                              "--variants", variant, "--peak-memory-only"], check=True, capture_output=True, text=True)
        last = out.stdout.strip().splitlines()[-1]
        peaks[variant] = last if last == "oom" else float(last)
        gc.collect()
    return peaks


def measure_batch(args, argv):
    """The rows of one batch size: step times, FLOPs and (--memory) peak memory, or "oom" for every
    variant where they ran out of GPU memory together."""
    try:
        results = measure_interleaved(args)
    except torch.OutOfMemoryError:
        results = [{"variant": variant, "oom": True} for variant in args.variants]
    release_memory(args)
    if args.memory and not results[0].get("oom"):
        peaks = memory_in_subprocesses(args, argv)
    else:
        peaks = {}
    for r in results:
        r.update(batch_size=args.batch_size, peak_mem_gib=peaks.get(r["variant"]))
    return results


def setting_of(args, batch=True):
    compiled = f"compiled ({args.compile_mode or 'default'})" if args.compile else "eager"
    layout = " channels_last" if args.channels_last else ""
    size = f" batch {args.batch_size}" if batch else ""
    return f"{args.model} input {args.input_size}{size} {args.precision} {compiled}{layout} on {args.device}"


def report(results, args, peak):
    """Print one batch size's rows and fill in their ratios, rates and MFU."""
    ok = [r for r in results if not r.get("oom")]
    baseline = next((r for r in ok if r["variant"] == "none"), None)
    base_mem = baseline.get("peak_mem_gib") if baseline else None
    for r in results:
        head = f"{args.batch_size:>6}  {r['variant']:<18}"
        if r.get("oom"):
            print(f"{head}{'oom':>10}")
            r.update(setting=setting_of(args), torch=torch.__version__)
            continue
        step_s = r["median_step_s"]
        time_ratio = step_s / baseline["median_step_s"] if baseline else float("nan")
        rate = r["model_flops_per_step"] / step_s / 1e12  # achieved model TFLOP/s
        mfu = rate / peak if peak else None
        method = r["method_flops_per_step"]
        counted = sum(v for v in method.values() if v is not None)
        method_text = (f"{counted / 1e9:.1f}" + ("+" if None in method.values() else "")) if method else "-"
        mem = r["peak_mem_gib"]
        mem_ratio = mem / base_mem if isinstance(mem, float) and isinstance(base_mem, float) else float("nan")
        mem_text = f"{mem:.2f}" if isinstance(mem, float) else (mem or "-")
        print(f"{head}{1000 * step_s:10.1f}{time_ratio:9.3f}{rate:10.4g}{f'{mfu:.1%}' if mfu else '-':>8}"
              f"{method_text:>12}{mem_text:>14}{mem_ratio:9.3f}")
        r.update(setting=setting_of(args), time_ratio=time_ratio, mem_ratio=mem_ratio, torch=torch.__version__,
                 model_tflops_per_s=rate, mfu=mfu)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-B/2", choices=models.MODEL_NAMES)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help="measure each of these batch sizes in turn (instead of --batch-size)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile's mode (implies --compile)")
    parser.add_argument("--channels-last", action="store_true",
                        help="input latents and the patch-embedding convolution in channels_last memory format")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4, help="alternate the variants in this many rounds")
    parser.add_argument("--memory", action="store_true", help="also measure each variant's peak memory alone")
    parser.add_argument("--peak-memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="append the results as JSON lines here")
    args = parser.parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    if args.peak_memory_only:
        try:
            print(peak_memory(args))
        except torch.OutOfMemoryError:
            print("oom")
        return
    precision = matmul_precision(args.precision)
    peak = peak_tflops(precision, args.device)
    where = device_name(args.device)
    unit = "GiB" if torch.device(args.device).type == "cuda" else "GiB RSS"
    print(f"# {setting_of(args, batch=False)} ({where}), torch {torch.__version__}, {args.rounds} rounds of "
          f"{args.steps // args.rounds} steps")
    known = f"{peak} TFLOP/s ({precision})" if peak else f"unknown for {where} ({precision}), no MFU"
    print(f"# {FLOP_CONVENTION}: {known}")
    print("# TFLOP/s: model FLOPs per second; method GF: the method's own GFLOP per step (+: and REPA's encoder)")
    print(f"{'batch':>6}  {'variant':<18}{'step ms':>10}{'vs none':>9}{'TFLOP/s':>10}{'MFU':>8}{'method GF':>12}"
          f"{'peak ' + unit:>14}{'vs none':>9}")
    for batch in args.batch_sizes or [args.batch_size]:
        batch_args = copy.copy(args)
        batch_args.batch_size = batch
        results = measure_batch(batch_args, argv)
        report(results, batch_args, peak)
        for r in results:
            r.update(device_name=where, precision=args.precision,
                     compile_mode=(args.compile_mode or "default") if args.compile else None,
                     channels_last=args.channels_last, peak_tflops=peak, peak_precision=precision,
                     flop_convention=FLOP_CONVENTION)
        if args.out:
            with args.out.open("a") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
