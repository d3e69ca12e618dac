"""--parallel fsdp: two CPU processes (gloo) train the same run as DDP, resume bit-identically, sample grids
with a sharded EMA, and write checkpoints that sampling reads like DDP's."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from errors import UserError
from training.checkpoints import read_checkpoint
from training.parallel import load_full_state_dict
from training.setup import check_resumable

ROOT = Path(__file__).resolve().parents[1]
# SRA with a teacher of its own (sharded besides the EMA), two micro-batches (gradient sync skipped on one),
# bf16 autocast, and DiT, whose learned-variance loss is sensitive to the prediction's dtype.
COMMON = ["--preset", "debug", "--num-workers", "0", "--tensorboard", "off", "--sample-every", "0",
          "--ckpt-every", "2", "--grad-accum-steps", "2", "--teacher-update", "ssl_cosine",
          "--teacher-momentum-steps", "4", "--model", "DiT-T/2", "--mixed-precision", "bf16"]
# DDP against FSDP after 4 steps: the same sums in another order (reduce-scatter vs all-reduce, a norm from
# two shards) differ by < 1e-7 in the weights (9.4e-8 measured) and < 1e-8 in the EMA and teacher; an EMA
# update skipped on one process differs by 1e-5.
TOLERANCE = {"model": 1e-6, "head": 1e-7, "ema": 1e-7, "teacher": 1e-7}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(tmp_path, data_dir, *argv):
    """train.py in two processes (torch.distributed.run); one run per launch, as on a cluster. A port taken
    between choosing it and binding it gets one more try on another."""
    script = tmp_path / "launch.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport train\ntrain.main(sys.argv[1:])\n")
    for attempt in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), str(script), *COMMON, "--data-dir", data_dir, "--results-dir", str(tmp_path / "runs"),
             *argv],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300, capture_output=True, text=True,
        )
        if done.returncode == 0:
            return
        if attempt == 0 and "address already in use" in (done.stdout + done.stderr).lower():
            continue
        raise AssertionError(f"the two-process run failed ({done.returncode}):\n{done.stderr[-3000:]}")


def checkpoint(tmp_path, name, step):
    return read_checkpoint(tmp_path / "runs" / name / "checkpoints" / f"step_{step:07d}.pt")


def same(a, b):
    """Exact equality of nested checkpoint values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """DDP and FSDP 4 steps straight; FSDP 2 steps, then the same command to step 4."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    launch(tmp_path, data_dir, "--run-name", "ddp", "--max-steps", "4")
    launch(tmp_path, data_dir, "--run-name", "fsdp", "--parallel", "fsdp", "--max-steps", "4", "--sample-every", "4")
    for steps in ("2", "4"):
        launch(tmp_path, data_dir, "--run-name", "resumed", "--parallel", "fsdp", "--max-steps", steps)
    return tmp_path


def test_fsdp_trains_what_ddp_trains(runs):
    ddp, fsdp = checkpoint(runs, "ddp", 4), checkpoint(runs, "fsdp", 4)
    for part in ("model", "ema", "teacher", "head"):
        assert ddp[part].keys() == fsdp[part].keys(), part  # whole tensors under the public key names
        for key in ddp[part]:
            assert ddp[part][key].shape == fsdp[part][key].shape
            torch.testing.assert_close(fsdp[part][key], ddp[part][key], rtol=0, atol=TOLERANCE[part],
                                       msg=f"{part}.{key}")
    moved = checkpoint(runs, "fsdp", 2)
    assert not torch.equal(moved["model"]["blocks.0.attn.qkv.weight"], fsdp["model"]["blocks.0.attn.qkv.weight"])
    assert not torch.equal(fsdp["teacher"]["blocks.0.attn.qkv.weight"], fsdp["ema"]["blocks.0.attn.qkv.weight"])
    # the optimizer state is keyed by name, one entry per trained parameter, as DDP's is by position
    trained = [k for k in fsdp["opt"]["state"]]
    assert len(trained) == len(ddp["opt"]["state"]) and trained[0].startswith("backbone.")
    assert fsdp["config"]["optim"]["parallel"] == "fsdp" and ddp["config"]["optim"]["parallel"] == "ddp"
    assert (runs / "runs" / "fsdp" / "samples_0000004.png").stat().st_size > 0  # grid from the sharded EMA


def test_fsdp_resumes_bit_identically(runs):
    straight, resumed = checkpoint(runs, "fsdp", 4), checkpoint(runs, "resumed", 4)
    for part in ("model", "ema", "teacher", "head", "opt", "rng", "sampler", "step"):
        assert same(straight[part], resumed[part]), part


def test_fsdp_checkpoint_loads_for_sampling(runs):
    from models import load_checkpoint

    path = runs / "runs" / "fsdp" / "checkpoints" / "step_0000004.pt"
    loaded = load_checkpoint(path)
    state = read_checkpoint(path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state["ema"][key]), key


def test_fsdp_resume_refuses_another_strategy(runs):
    saved = checkpoint(runs, "resumed", 4)["config"]
    as_ddp = {**saved, "optim": {**saved["optim"], "parallel": "ddp"}}
    with pytest.raises(UserError, match=r"optim.parallel: 'fsdp' -> 'ddp'"):
        check_resumable(saved, as_ddp)
    older = {**saved, "optim": {k: v for k, v in saved["optim"].items() if k != "parallel"}}
    check_resumable(older, as_ddp)  # records from before --parallel ran DDP


def test_fsdp_refusals(tmp_path, data_dir):
    base = [*COMMON, "--data-dir", data_dir, "--results-dir", str(tmp_path), "--parallel", "fsdp"]
    with pytest.raises(UserError, match="--parallel fsdp shards the model over processes and this launch has one"):
        train.main([*base, "--mixed-precision", "no"])  # (the in-process accelerate state of the other tests)
    with pytest.raises(UserError, match="--parallel fsdp runs with --mixed-precision bf16 or no"):
        train.main([*base, "--mixed-precision", "fp16"])
    with pytest.raises(UserError, match="--compile-mode reduce-overhead records CUDA graphs"):
        train.main([*base, "--compile", "on", "--compile-mode", "reduce-overhead"])
    assert not tmp_path.joinpath("debug").exists()


def test_whole_state_dicts_load_unsharded():
    """Without sharding, the loader is load_state_dict itself (strict)."""
    model = torch.nn.Linear(3, 2)
    other = torch.nn.Linear(3, 2)
    load_full_state_dict(other, model.state_dict())
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_full_state_dict(other, {"weight": model.weight})


def test_fsdp_trains_mmdit_as_ddp(tmp_path):
    """MMDiT: joint blocks sharded, the position table a buffer (not sharded), text contexts; fp32, where the
    two strategies differ only in the order of sums."""
    from preprocessing.__main__ import main as preprocess
    from tests.text_fixtures import tiny_text_encoder_dir, write_captioned_images

    encoder = tiny_text_encoder_dir(tmp_path / "clip-text", width=16)
    captions = write_captioned_images(tmp_path / "images", count=12, size=8)
    preprocess(["--input", str(tmp_path / "images"), "--captions", str(captions), "--text-encoder", str(encoder),
                "--output", str(tmp_path / "coco"), "--vae", "none", "--resolution", "8", "--num-workers", "0"])
    # after COMMON's flags: a flag given twice takes its last value
    text = ["--preset", "mmdit-coco-sra", "--model", "MMDiT-D6/2", "--global-batch-size", "4",
            "--mixed-precision", "no", "--max-steps", "2"]
    for name, strategy in [("mmdit-ddp", "ddp"), ("mmdit-fsdp", "fsdp")]:
        launch(tmp_path, str(tmp_path / "coco"), *text, "--run-name", name, "--parallel", strategy)
    ddp, fsdp = checkpoint(tmp_path, "mmdit-ddp", 2), checkpoint(tmp_path, "mmdit-fsdp", 2)
    for part in ("model", "ema", "head"):
        assert ddp[part].keys() == fsdp[part].keys()
        for key in ddp[part]:
            torch.testing.assert_close(fsdp[part][key], ddp[part][key], rtol=0, atol=1e-7, msg=f"{part}.{key}")
    assert torch.equal(fsdp["ema"]["pos_embed"], ddp["ema"]["pos_embed"])
    assert fsdp["config"]["model"]["model"] == "MMDiT-D6/2" and fsdp["config"]["data"]["condition"] == "text"
