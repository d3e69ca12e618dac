"""What the teacher's precision does to SRA's target and loss (`--teacher-precision`), on a real-size model.

The teacher's block-k_T tokens are computed by SRA's own `target` (same x0, ε, t, Δ and labels) in fp32
(the reference), bf16 autocast and FP8 (models/fp8.py: the blocks' token-wise linear layers in e4m3 with
row-wise scales, the rest in bf16); then, per pair of precisions, the per-token cosine similarity and
SRA's smooth-L1 distance (β = 0.05, over the features) between the two targets, and SRA's alignment loss
of one student against each target, with its relative difference and the cosine between the loss's
gradients at the student's tokens (what training follows).

Weights: a checkpoint's EMA (`--checkpoint`), or random weights drawn as the model's own initialization
except that the layers it starts at zero (every adaLN modulation and the final layer, "adaLN-Zero") are
drawn like the other linear layers, since at zero every block is the identity and the target would be
the patch embedding. The student is a second random model of the same architecture with SRA's head.

On a CPU, torch._scaled_mm multiplies the same e4m3 operands with fp32 accumulation, so the quantization
error measured there is the GPU's up to the order of the fp32 sums; on a Hopper GPU the real kernels run.

    python bench/check_teacher_precision.py --model SiT-XL/2 --batch-size 8          # ~3 min on 2 CPU cores
    python bench/check_teacher_precision.py --checkpoint results/run/checkpoints/step_0400000.pt
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
import sra  # noqa: E402
from guidance import AlignmentInputs, GuidanceContext, Student, token_distance  # noqa: E402
from guidance.distances import SMOOTH_L1_BETA  # noqa: E402
from objectives.registry import objective_for_model  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp8")  # fp32: the teacher without autocast (the release's teacher)
NUM_CLASSES = 1000  # ImageNet


def open_zero_layers_(model, seed):
    """Draw the adaLN-Zero layers like the model's other linear layers (Xavier-uniform weights), with small
    random biases, so that every block changes the tokens."""
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ("adaLN_modulation" in name or name.startswith("final_layer")):
            bound = (6.0 / (module.in_features + module.out_features)) ** 0.5
            with torch.no_grad():
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.normal_(0.0, 0.02, generator=generator)
    return model


def build(args):
    if args.checkpoint:
        loaded = models.load_checkpoint(args.checkpoint)
        name, teacher = loaded.name, loaded.model
    else:
        name = args.model
        torch.manual_seed(args.seed)
        teacher = open_zero_layers_(models.create_model(name, args.input_size, 4, NUM_CLASSES), args.seed)
    torch.manual_seed(args.seed + 1)
    student_backbone = open_zero_layers_(
        models.create_model(name, teacher.input_size, teacher.in_channels, NUM_CLASSES), args.seed + 1)
    return name, teacher.eval().requires_grad_(False), student_backbone.eval().requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-XL/2", choices=models.MODEL_NAMES)
    parser.add_argument("--checkpoint", help="measure on this checkpoint's EMA instead of random weights")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="append the result as one JSON line here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    name, teacher, student_backbone = build(args)
    teacher.to(device)
    objective = objective_for_model(name)
    defaults = sra.SRAConfig().resolved_for(name, teacher.depth)
    methods = {}
    for precision in PRECISIONS:
        config = sra.SRAConfig(student_depth=defaults.student_depth, teacher_depth=defaults.teacher_depth,
                               teacher_precision="step" if precision == "fp32" else precision)
        # the CPU's _scaled_mm computes the GPU's quantized products; the capability check is for training
        with mock.patch("sra.method.fp8_unsupported", return_value=None):
            methods[precision] = sra.SRA(config, GuidanceContext(objective, teacher, student_backbone, device))
    head = methods["fp32"].build_head(student_backbone.hidden_size)
    student = Student(student_backbone, head, defaults.student_depth).to(device).eval()

    generator = torch.Generator().manual_seed(args.seed)
    n, side = args.batch_size, teacher.input_size
    x0 = torch.randn(n, teacher.in_channels, side, side, generator=generator).to(device)
    eps = torch.randn(n, teacher.in_channels, side, side, generator=generator).to(device)
    t = objective.sample_time(n, "cpu", generator=generator).to(device)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator).to(device)
    targets = {}
    with torch.no_grad():
        for precision, method in methods.items():
            torch.manual_seed(args.seed)  # the same Δ for every precision
            targets[precision] = method.target(AlignmentInputs(x0, eps, t, y, None)).float()
        _, projected = student(objective.noisy(x0, eps, t), objective.model_time(t), y)
        projected = projected.float()
    losses, grads = {}, {}
    for precision, target in targets.items():  # the loss and its gradient at the student's tokens
        leaf = projected.clone().requires_grad_(True)
        loss = token_distance(leaf, target, "smooth_l1").mean()
        loss.backward()
        losses[precision], grads[precision] = loss.item(), leaf.grad.flatten().double()
    rows = []
    for a, b in itertools.combinations(PRECISIONS, 2):
        cosine = F.cosine_similarity(targets[a], targets[b], dim=-1)
        rows.append({
            "pair": f"{b} vs {a}",
            "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "smooth_l1": token_distance(targets[a], targets[b], "smooth_l1", SMOOTH_L1_BETA).mean().item(),
            "relative_l2": ((targets[a] - targets[b]).norm() / targets[a].norm()).item(),
            "loss_relative_difference": abs(losses[b] - losses[a]) / losses[a],
            "gradient_cosine": F.cosine_similarity(grads[a], grads[b], dim=0).item(),
        })
    scale = token_distance(projected, targets["fp32"], "smooth_l1").mean().item()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name} {'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights (adaLN open)'}, "
          f"batch {n}, block pair {defaults.student_depth} -> {defaults.teacher_depth}, {where}, "
          f"torch {torch.__version__}, {time.perf_counter() - start:.0f} s")
    print("SRA alignment loss (smooth-L1, student against the teacher): "
          + ", ".join(f"{p} {v:.6f}" for p, v in losses.items()))
    print(f"{'pair':<14}{'cos mean':>10}{'cos min':>10}{'smooth-L1':>12}{'rel. L2':>10}{'loss diff':>11}"
          f"{'grad cos':>10}")
    for r in rows:
        print(f"{r['pair']:<14}{r['cosine_mean']:10.6f}{r['cosine_min']:10.6f}{r['smooth_l1']:12.3e}"
              f"{r['relative_l2']:10.4f}{r['loss_relative_difference']:11.2e}{r['gradient_cosine']:10.6f}")
    print(f"(for scale: the student-teacher smooth-L1 itself is {scale:.4e})")
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps({"model": name, "checkpoint": args.checkpoint, "batch_size": n, "device": where,
                                "torch": torch.__version__, "losses": losses, "pairs": rows}) + "\n")


if __name__ == "__main__":
    main()
