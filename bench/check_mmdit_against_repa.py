"""Check models/mmdit.py against REPA's own `models/mmdit.py` (its MS-COCO text-to-image MMDiT), by hand.

Not part of the test suite (tests/test_mmdit.py compares against a transcription of REPA's math): this
imports REPA's file itself. That file needs einops, which this project does not depend on, and imports
transformers' CLIPTokenizer/T5TokenizerFast at module level (present in transformers 5). Install einops
outside the project and point --site at it:

    pip install --target /tmp/repa_check/site einops
    python bench/check_mmdit_against_repa.py --repa /path/to/REPA --site /tmp/repa_check/site

--repa is a REPA checkout (its models/mmdit.py is read) or a git directory of one, a bare mirror included
(the file is read with `git show REV:models/mmdit.py`, REV from --rev, default HEAD).

What is compared, in float32 on the CPU:
  * small models (REPA's shape rule: depth d, width 32·d, d heads; input 32, patch 2, 768-wide contexts,
    so REPA's 16×16 position table is cropped to itself), with REPA's own initialization and with every
    parameter redrawn at std 0.1, with and without qk-norm: REPA's state dict, projectors split off, is
    loaded into ours with strict=True, and ours must give REPA's prediction, REPA's image tokens after
    block `encoder_depth` (hooked from REPA's x stream) and, through REPA's projector applied to our
    tokens, REPA's zs;
  * our freshly built position table against REPA's buffer;
  * REPA's default model (depth 24, width 768) against MMDiT-D24/2: parameter count without projectors,
    and (unless --skip-full-forward) one forward at REPA's own initialization.
"""
import argparse
import contextlib
import importlib.util
import io
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402

REPA_FILE = "models/mmdit.py"
CONTEXT_DIM = 768  # REPA hard-codes context_embedder Linear(768, hidden)
INPUT_SIZE = 32  # REPA hard-codes pos_embed_max_size 16: 256 px latents with patch 2
CONTEXT_LENGTH = 77  # CLIP's token count
RANDOM_STD = 0.1
TOLERANCE = 1e-5  # float32; zs relative to their magnitude (REPA's 2048-wide projector amplifies)


def repa_source(repa, rev):
    """(source text of REPA's models/mmdit.py, where it came from)."""
    checkout = Path(repa) / REPA_FILE
    if checkout.is_file():
        return checkout.read_text(), str(checkout)
    source = subprocess.run(["git", "-C", str(repa), "show", f"{rev}:{REPA_FILE}"], check=True,
                            capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "-C", str(repa), "rev-parse", rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    return source, f"{repa} @ {commit}"


def import_repa(source, folder):
    """REPA's file as module `repa_mmdit` (its own name would clash with this project's `models`)."""
    path = Path(folder) / "repa_mmdit.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("repa_mmdit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_repa(module, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # REPA prints its configuration
        return module.MMDiT(**kwargs).eval()


def redraw_(model, seed, std=RANDOM_STD):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def split_projectors(state_dict):
    backbone = {key: value for key, value in state_dict.items() if not key.startswith("projectors.")}
    return backbone, len(state_dict) - len(backbone)


def ours_for(depth, qk_norm, fused_attn=True):
    return models.create_model("MMDiT-D6/2", input_size=INPUT_SIZE, depth=depth, hidden_size=32 * depth,
                               num_heads=depth, context_dim=CONTEXT_DIM, qk_norm=qk_norm,
                               fused_attn=fused_attn).eval()


def inputs(n, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, INPUT_SIZE, INPUT_SIZE, generator=generator)
    t = torch.rand(n, generator=generator)
    context = torch.randn(n, CONTEXT_LENGTH, CONTEXT_DIM, generator=generator)
    return x, t, context


def max_diff(a, b):
    return (a - b).abs().max().item()


def compare(repa_model, ours_models, encoder_depth, x, t, context):
    """Max abs differences of our models against REPA's module on one batch."""
    captured = {}

    def capture(module, args, output):
        captured["tokens"] = output[1]  # JointBlock returns (context, x)

    hook = repa_model.joint_blocks[encoder_depth - 1].register_forward_hook(capture)
    with torch.no_grad():
        expected, zs = repa_model(x, t, context=context)
    hook.remove()
    tokens = captured["tokens"]
    rows = {}
    for label, ours in ours_models.items():
        with torch.no_grad():
            prediction, features = ours.forward_with_features(x, t, context, encoder_depth)
            alone = ours.forward_features(x, t, context, encoder_depth)
            n, length, width = features.shape
            projected = repa_model.projectors[0](features.reshape(-1, width)).reshape(n, length, -1)
        rows[label] = {
            "prediction": max_diff(prediction, expected),
            "tokens": max_diff(features, tokens),
            "forward_features": max_diff(alone, tokens),
            "zs": max_diff(projected, zs[0]),
            "scale": expected.abs().max().item(),
            "zs_scale": zs[0].abs().max().item(),
        }
    return rows


def small_checks(module, depth, batch, seed):
    results = []
    for qk_norm in (None, "ln"):
        for weights in ("REPA init", f"std {RANDOM_STD}"):
            encoder_depth = 2 if qk_norm is None else depth - 1
            torch.manual_seed(seed)
            repa_model = build_repa(module, input_size=INPUT_SIZE, depth=depth, qk_norm=qk_norm,
                                    encoder_depth=encoder_depth)
            if weights != "REPA init":
                redraw_(repa_model, seed)
            backbone, projector_keys = split_projectors(repa_model.state_dict())
            ours_models = {}
            for fused in (True, False):
                ours = ours_for(depth, qk_norm is not None, fused_attn=fused)
                table = max_diff(ours.pos_embed, backbone["pos_embed"])
                ours.load_state_dict(backbone, strict=True)
                ours_models["SDPA" if fused else "explicit"] = ours
            rows = compare(repa_model, ours_models, encoder_depth, *inputs(batch, seed + 1))
            for attention, row in rows.items():
                results.append({"depth": depth, "qk_norm": qk_norm, "weights": weights, "attention": attention,
                                "encoder_depth": encoder_depth, "pos_embed": table,
                                "projector_keys": projector_keys, **row})
    return results


def full_size(module, forward, batch, seed):
    torch.manual_seed(seed)
    repa_model = build_repa(module)  # REPA's defaults: depth 24, input 32, patch 2, encoder_depth 8
    repa_count = sum(p.numel() for name, p in repa_model.named_parameters() if not name.startswith("projectors."))
    ours = models.create_model("MMDiT-D24/2", input_size=INPUT_SIZE).eval()
    ours_count = sum(p.numel() for p in ours.parameters())
    result = {"repa_parameters": repa_count, "ours_parameters": ours_count}
    if forward:
        backbone, _ = split_projectors(repa_model.state_dict())
        result["pos_embed"] = max_diff(ours.pos_embed, backbone["pos_embed"])
        ours.load_state_dict(backbone, strict=True)
        start = time.perf_counter()
        result.update(compare(repa_model, {"SDPA": ours}, repa_model.encoder_depth, *inputs(batch, seed + 1))["SDPA"])
        result["seconds"] = time.perf_counter() - start
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repa", required=True, help="REPA checkout or git directory (bare mirror)")
    parser.add_argument("--rev", default="HEAD", help="revision to read from a git directory")
    parser.add_argument("--site", help="folder holding einops (pip install --target), put on sys.path")
    parser.add_argument("--depth", type=int, default=4, help="depth of the small models")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full-forward", action="store_true",
                        help="count the depth-24 model's parameters only, without its forward pass")
    args = parser.parse_args(argv)
    if args.site:
        sys.path.insert(0, args.site)
    source, origin = repa_source(args.repa, args.rev)
    print(f"REPA: {origin}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; float32")
    worst = 0.0  # max abs difference of predictions, tokens and position tables
    worst_zs = 0.0  # of the projected tokens, relative to their largest magnitude where it exceeds 1
    with tempfile.TemporaryDirectory() as folder:
        module = import_repa(source, folder)
        header = ("depth", "qk_norm", "weights", "attention", "block", "|pred|", "pred", "tokens", "fwd_feat",
                  "|zs|", "zs", "pos_embed")
        print(" | ".join(header))
        for row in small_checks(module, args.depth, args.batch, args.seed):
            worst = max(worst, *(row[key] for key in ("prediction", "tokens", "forward_features", "pos_embed")))
            worst_zs = max(worst_zs, row["zs"] / max(1.0, row["zs_scale"]))
            print(f"{row['depth']} | {row['qk_norm']} | {row['weights']} | {row['attention']} | "
                  f"{row['encoder_depth']} | {row['scale']:.2f} | {row['prediction']:.2e} | {row['tokens']:.2e} | "
                  f"{row['forward_features']:.2e} | {row['zs_scale']:.1f} | {row['zs']:.2e} | {row['pos_embed']:.1e}")
        full = full_size(module, not args.skip_full_forward, min(args.batch, 2), args.seed)
    print(f"depth 24: REPA {full['repa_parameters']:,} parameters without projectors, ours {full['ours_parameters']:,}")
    if "prediction" in full:
        worst = max(worst, *(full[key] for key in ("prediction", "tokens", "forward_features", "pos_embed")))
        worst_zs = max(worst_zs, full["zs"] / max(1.0, full["zs_scale"]))
        print(f"depth 24 (REPA init, block 8, |pred| {full['scale']:.2f}, |zs| {full['zs_scale']:.1f}): "
              f"pred {full['prediction']:.2e}, tokens {full['tokens']:.2e}, forward_features "
              f"{full['forward_features']:.2e}, zs {full['zs']:.2e}, pos_embed {full['pos_embed']:.1e} "
              f"({full['seconds']:.1f} s)")
    ok = full["repa_parameters"] == full["ours_parameters"] and worst <= TOLERANCE and worst_zs <= TOLERANCE
    print(f"worst max abs difference {worst:.2e} (zs, relative: {worst_zs:.2e}): {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
