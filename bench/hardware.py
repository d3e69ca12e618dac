"""Dense peak TFLOP/s of the GPUs this project runs on, by precision: the denominator of MFU (bench_train_step.py).

NVIDIA's datasheets list the tensor-core rates "with sparsity" (2:4 structured sparsity); the dense rates,
which dense training can reach at best, are half of those. Sources: the H100 datasheet (SXM and PCIe
columns), the H200 datasheet (SXM: the same tensor-core rates as the H100 SXM), the A100 datasheet
(SXM and PCIe alike; no FP8). fp32 is the CUDA cores' non-tensor rate; fp32 matmuls with TF32 allowed
run at the tf32 rate.
"""
import torch

# (substring of torch.cuda.get_device_name(), {precision: dense TFLOP/s}), first match wins: the more
# specific names come first. An empty row: a variant whose rates differ from its family's and are not listed.
# The comments give the datasheet's "with sparsity" fp8, bf16/fp16 and tf32 figures that the rates halve.
PEAK_TFLOPS = (
    ("MIG", {}),  # a MIG slice has a share of the SMs
    ("NVL", {}),  # H100 NVL, H200 NVL: lower clocks than SXM
    ("H100 PCIe", {"fp8": 1513, "bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),  # 3026, 1513, 756
    ("H100", {"fp8": 1978.9, "bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67}),  # SXM: 3958, 1979, 989
    ("H200", {"fp8": 1978.9, "bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67}),  # SXM: 3958, 1979, 989
    ("A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),  # no fp8; 624, 312
)
PRECISIONS = ("fp8", "bf16", "fp16", "tf32", "fp32")


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_tflops(precision, device="cuda"):
    """The dense peak TFLOP/s of `device` at `precision` (PRECISIONS), or None where unknown: not a CUDA
    device, a GPU not in PEAK_TFLOPS, or a precision it has no tensor-core rate for."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_of(device_name(device), precision)


def peak_of(name, precision):
    """The dense peak TFLOP/s of the GPU named `name` (as torch.cuda.get_device_name) at `precision`, or None."""
    row = next((rates for key, rates in PEAK_TFLOPS if key in name), {})
    return row.get(precision)


def matmul_precision(precision):
    """The peak that an autocast precision's matmuls run at: bf16/fp16 as such, fp32 at the TF32 rate
    where CUDA matmuls may use TF32 (torch.backends.cuda.matmul.allow_tf32)."""
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision
