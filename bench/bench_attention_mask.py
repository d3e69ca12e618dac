"""What attention separation's group mask costs scaled_dot_product_attention, and which kernels take it.

Attention separation (dts/, `--attention-separation on`) passes a boolean (N, 1, T, T) mask to SDPA.
Flash attention takes no arbitrary mask; this measures forward + backward of one attention call at a
model's shapes without a mask and with the release's group mask (1/4 and 3/4 of the tokens), with
PyTorch's own kernel choice and, on CUDA, with each SDPA backend forced (a backend that refuses the
mask is reported as such). All variants alternate in rounds in one process.

    python bench/bench_attention_mask.py --model SiT-B/2 --batch-size 8              # CPU
    python bench/bench_attention_mask.py --model SiT-XL/2 --batch-size 32 --dtype bf16  # GPU
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from dts import TokenGrouping, TokenGroupsConfig  # noqa: E402
from transport.objective import FlowObjective  # noqa: E402

RELEASE_RATIO = (0.25,)  # SiT-SRA_DTS_AS/scripts/train.sh


def group_mask(n, tokens, device):
    config = TokenGroupsConfig(RELEASE_RATIO, attention_separation=True)
    grouping = TokenGrouping(config, FlowObjective(), tokens, patch_size=1)
    return models.TokenGroups(grouping.draw_ids(n, device), separate=True).attention_mask()


def backends():
    if not torch.cuda.is_available():
        return {"default": None}
    from torch.nn.attention import SDPBackend

    return {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def make_call(q, k, v, mask, backend):
    def call():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward()

    if backend is None:
        return call
    from torch.nn.attention import sdpa_kernel

    def forced():
        with sdpa_kernel([backend]):
            call()
    return forced


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-B/2", choices=models.MODEL_NAMES)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    _, size, patch = models.parse_model_name(args.model)
    depth, width, heads = models.SIZES[size]
    tokens = (args.input_size // patch) ** 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shape = (args.batch_size, heads, tokens, width // heads)
    q, k, v = (torch.randn(shape, device=args.device, dtype=dtype, requires_grad=True) for _ in range(3))
    masks = {"no mask": None, "group mask": group_mask(args.batch_size, tokens, args.device)}
    calls = {}
    for backend_name, backend in backends().items():
        for mask_name, mask in masks.items():
            call = make_call(q, k, v, mask, backend)
            try:
                call()
            except RuntimeError as error:
                print(f"{backend_name:>9} {mask_name:<10}: refused ({str(error).splitlines()[0][:80]})")
                continue
            calls[(backend_name, mask_name)] = call
    times = {key: [] for key in calls}
    per_round = max(args.steps // args.rounds, 1)
    for _ in range(args.rounds):
        for key, call in calls.items():
            for _ in range(per_round):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                call()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[key].append(time.perf_counter() - start)
    print(f"# {args.model} ({tokens} tokens, {heads} heads of {width // heads}), batch {args.batch_size}, "
          f"{args.dtype} on {args.device}, torch {torch.__version__}; forward + backward of one attention call")
    print(f"{'backend':>9} {'mask':<10} {'ms':>9} {'vs no mask':>11}")
    for (backend_name, mask_name), values in times.items():
        ms = 1000 * statistics.median(values)
        base = times.get((backend_name, "no mask"))
        ratio = ms / (1000 * statistics.median(base)) if base else float("nan")
        print(f"{backend_name:>9} {mask_name:<10} {ms:9.3f} {ratio:11.3f}")


if __name__ == "__main__":
    main()
