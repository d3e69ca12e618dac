"""FP8 matrix multiplies for forwards without gradients (SRA's `--teacher-precision fp8`).

A linear layer y = x·Wᵀ + b becomes (s_x ⊙ q_x)·(s_w ⊙ q_w)ᵀ + b: every row of x (a token) and every row
of W (an output channel) is divided by its own scale s = max|row| / 448, so that its largest magnitude lands
on the largest finite e4m3 value, and rounded to float8_e4m3fn; `torch._scaled_mm` multiplies the FP8
operands with fp32 accumulation and applies the two scales in its epilogue ("row-wise" scaling, the finest
that Hopper's FP8 GEMMs take). Weights are quantized at every call from their current values: the
teacher runs once per step and its EMA weights move after every step, so a cache would never hit.

Quantizing costs memory passes the matmul does not hide: per call, one read of each operand for its row
maxima and one read plus a one-byte write for the rounding (eager; `--compile` fuses them into the ops
that produce the operands). The speed-up is a GPU measurement (BENCHMARKS.md), not an assumption.

Only the token-wise linear layers inside the blocks run in FP8 (`token_linears`): attention's qkv and
output projections and the MLP, which hold nearly all of a block's FLOPs. The adaLN modulation, one row per
image, and everything outside the blocks keep the surrounding precision.
"""
import contextlib
import functools
import math

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn  # the forward format of FP8 training recipes (NVIDIA Transformer Engine)
E4M3_MAX = torch.finfo(E4M3).max  # 448, the largest finite e4m3 value
AMAX_FLOOR = 1e-12  # the scale of an all-zero row (its FP8 values are zero whatever the scale)
GEMM_ALIGNMENT = 16  # cuBLAS FP8 GEMMs need both weight dimensions to be multiples of 16
FP8_CAPABILITY = (9, 0)  # row-wise scaled FP8 GEMMs in torch._scaled_mm: Hopper (sm_90) and newer


def fp8_unsupported(device) -> str | None:
    """Why FP8 teacher forwards cannot run on `device` (a torch.device), or None where they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"FP8 matrix multiplies need an NVIDIA GPU of compute capability {FP8_CAPABILITY[0]}.0 "
                f"(Hopper) or newer; this run is on the {device.type.upper()}")
    if torch.version.hip is not None:
        return ("this torch is built for ROCm, whose FP8 formats differ from the e4m3fn (and its row-wise "
                "scaled matmuls) this path uses")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                f"row-wise scaled FP8 matrix multiplies need {FP8_CAPABILITY[0]}.0 (Hopper) or newer")
    return None


def quantize_rows(x):
    """x (M, K) -> (q (M, K) float8_e4m3fn, scale (M, 1) float32) with x ≈ q·scale and max|q| = 448 per row.

    |x / scale| ≤ 448 up to fp32 rounding, which rounds back to 448 (only values from 464 on, halfway to
    e4m3's next power of two, would overflow), so no clamp pass is needed."""
    amax = torch.linalg.vector_norm(x.detach(), ord=math.inf, dim=-1, keepdim=True).float()
    scale = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    return (x / scale).to(E4M3), scale


def fp8_linear(x, weight, bias=None, out_dtype=torch.bfloat16):
    """x (..., K) @ weight (N, K)ᵀ + bias in FP8 with row-wise scales; the result in `out_dtype`."""
    rows = x.reshape(-1, x.shape[-1])
    q_x, scale_x = quantize_rows(rows)
    q_w, scale_w = quantize_rows(weight)
    # _scaled_mm takes the second operand column-major: the transpose of the row-major (N, K) weight.
    out = torch._scaled_mm(q_x, q_w.t(), scale_a=scale_x, scale_b=scale_w.t(), out_dtype=out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def token_linears(backbone) -> list[nn.Linear]:
    """The linear layers of a backbone's blocks (`block_list`) that act on tokens and have FP8-compatible
    shapes: every nn.Linear in a block except the adaLN modulation."""
    return [module for name, module in backbone.block_list.named_modules()
            if isinstance(module, nn.Linear) and "adaLN_modulation" not in name
            and not (module.in_features % GEMM_ALIGNMENT or module.out_features % GEMM_ALIGNMENT)]


def _fp8_forward(module, x):
    return fp8_linear(x, module.weight, module.bias)


@contextlib.contextmanager
def fp8_linears(linears):
    """Within the block, the given nn.Linear modules compute in FP8 (fp8_linear, bf16 output); they are
    restored on exit, so the same model samples in full precision outside it."""
    for module in linears:
        module.forward = functools.partial(_fp8_forward, module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward
