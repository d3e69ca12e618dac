"""A user's mistake at any entry point prints one line, `error: …`, exits with status 2, and writes nothing.

Each case runs the entry point's `main` through `errors.run_cli`, in process, exactly as its
`__main__` does; a traceback (any other exception) fails the case. The README's count of handled
mistakes is the number of cases here.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import train
from analysis.__main__ import main as analysis_main
from analysis.curves import main as curves_main
from demo.__main__ import main as demo_main
from errors import EXIT_USER_ERROR, run_cli
from evaluations.evaluator import main as evaluator_main
from preprocessing.__main__ import main as preprocess_main
from sample_ddp import main as sample_main
from tests.helpers import tiny_vae_dir, write_class_images


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pixel dataset, a finished debug run, image files, and a file that is not a folder."""
    root = tmp_path_factory.mktemp("user_errors")
    write_class_images(root / "images", classes=2, per_class=10)  # 20: the probe holds out 10%, at least 2
    rng = np.random.default_rng(0)
    preprocess_main(["--input", str(root / "images"), "--output", str(root / "data"), "--vae", "none",
                     "--resolution", "8", "--num-workers", "0"])
    train.main(["--preset", "debug", "--data-dir", str(root / "data"), "--results-dir", str(root / "runs"),
                "--max-steps", "1", "--sample-every", "0", "--tensorboard", "off", "--run-name", "done"])
    np.savez(root / "small.npz", arr_0=rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8))
    np.savez(root / "large.npz", arr_0=rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    np.savez(root / "floats.npz", arr_0=rng.random((8, 16, 16, 3)).astype(np.float32))
    (root / "garbage.npz").write_bytes(b"this is not a zip file")
    (root / "a-file").write_text("")
    tiny_vae_dir(root)  # 4 latent channels: the pixel model's grids cannot be decoded by it
    return root


def train_argv(root, *flags):
    return ["--preset", "debug", "--data-dir", str(root / "data"), "--results-dir", str(root / "new-runs"),
            "--tensorboard", "off", *flags]


def probe_argv(root, *flags):
    checkpoint = root / "runs" / "done" / "checkpoints" / "step_0000001.pt"
    base = {"--ckpt": str(checkpoint), "--data-dir": str(root / "data"), "--output-dir": str(root / "probe"),
            "--blocks": "1", "--times": "0"}
    base.update(dict(zip(flags[::2], flags[1::2])))
    return [item for pair in base.items() for item in pair]


def sample_argv(root, *flags):
    checkpoint = root / "runs" / "done" / "checkpoints" / "step_0000001.pt"
    return ["--ckpt", str(checkpoint), "--vae", "none", "--output-dir", str(root / "samples"), *flags]


# (entry point, argv builder from the fixture root, words the one line must contain)
CASES = {
    # train.py
    "train: no --data-dir": (train.main, lambda r: ["--preset", "debug"], "--data-dir is required"),
    "train: --data-dir missing": (train.main, lambda r: train_argv(r, "--data-dir", str(r / "nope")), "nope"),
    "train: --data-dir a file": (train.main, lambda r: train_argv(r, "--data-dir", str(r / "a-file")), "a-file"),
    "train: --data-dir not a dataset": (train.main, lambda r: train_argv(r, "--data-dir", str(r / "images")),
                                        "index.json"),
    "train: --t-max 1.5": (train.main, lambda r: train_argv(r, "--t-max", "1.5"), "--t-max 1.5"),
    "train: --t-max -0.1": (train.main, lambda r: train_argv(r, "--t-max", "-0.1"), "--t-max -0.1"),
    "train: --lr -1e-3": (train.main, lambda r: train_argv(r, "--lr", "-1e-3"), "--lr -0.001: must be > 0"),
    "train: --lr 0": (train.main, lambda r: train_argv(r, "--lr", "0"), "--lr 0.0"),
    "train: --global-batch-size 0": (train.main, lambda r: train_argv(r, "--global-batch-size", "0"),
                                     "--global-batch-size 0"),
    "train: batch not divisible": (train.main, lambda r: train_argv(r, "--global-batch-size", "10",
                                                                    "--grad-accum-steps", "4"), "not divisible"),
    "train: --ckpt-every 0": (train.main, lambda r: train_argv(r, "--ckpt-every", "0"), "--ckpt-every 0"),
    "train: --log-every 0": (train.main, lambda r: train_argv(r, "--log-every", "0"), "--log-every 0"),
    "train: --keep-last 0": (train.main, lambda r: train_argv(r, "--keep-last", "0"), "--keep-last 0"),
    "train: --ema-decay 2": (train.main, lambda r: train_argv(r, "--ema-decay", "2"), "--ema-decay 2.0"),
    "train: --teacher-depth 0": (train.main, lambda r: train_argv(r, "--teacher-depth", "0"), "--teacher-depth 0"),
    "train: teacher shallower than student": (
        train.main, lambda r: train_argv(r, "--student-depth", "5", "--teacher-depth", "2"), "shallower"),
    "train: --teacher-depth 9": (train.main, lambda r: train_argv(r, "--teacher-depth", "9"), "outside"),
    "train: --path for DiT": (train.main, lambda r: train_argv(r, "--model", "DiT-T/2", "--path", "cosine"),
                              "--path applies to SiT/MMDiT models"),
    "train: --dit-teacher-min-step for SiT": (train.main, lambda r: train_argv(r, "--dit-teacher-min-step", "1"),
                                              "applies to DiT models"),
    "train: --teacher-depth with repa": (train.main, lambda r: train_argv(r, "--guidance", "repa",
                                                                          "--teacher-depth", "3"),
                                         "does not apply to --guidance repa"),
    "train: --t-max with none": (train.main, lambda r: train_argv(r, "--guidance", "none", "--t-max", "0.1"),
                                 "does not apply to --guidance none"),
    "train: --sra off --guidance sra": (train.main, lambda r: train_argv(r, "--sra", "off", "--guidance", "sra"),
                                        "contradicts"),
    "train: unknown model": (train.main, lambda r: train_argv(r, "--model", "SiT-Q/2"), "--model"),
    "train: unknown preset": (train.main, lambda r: ["--preset", "nope"], "--preset"),
    "train: --max-steps abc": (train.main, lambda r: train_argv(r, "--max-steps", "abc"), "--max-steps"),
    "train: --mixed-precision fp8": (train.main, lambda r: train_argv(r, "--mixed-precision", "fp8"),
                                     "--mixed-precision"),
    "train: unknown flag": (train.main, lambda r: train_argv(r, "--bogus"), "--bogus"),
    "train: --teacher-precision fp8 on the CPU": (train.main, lambda r: train_argv(r, "--teacher-precision", "fp8"),
                                                  "--teacher-precision fp8: FP8 matrix multiplies need an NVIDIA GPU"),
    "train: --teacher-precision fp4": (train.main, lambda r: train_argv(r, "--teacher-precision", "fp4"),
                                       "--teacher-precision"),
    "train: --parallel fsdp in one process": (train.main, lambda r: train_argv(r, "--parallel", "fsdp"),
                                              "--parallel fsdp shards the model over processes"),
    "train: --parallel fsdp with fp16": (train.main, lambda r: train_argv(r, "--parallel", "fsdp",
                                                                          "--mixed-precision", "fp16"),
                                         "--parallel fsdp runs with --mixed-precision bf16 or no"),
    "train: --eval-every without --eval-ref": (train.main, lambda r: train_argv(r, "--eval-every", "5"),
                                               "--eval-ref"),
    "train: --eval-ref missing": (train.main, lambda r: train_argv(r, "--eval-every", "2", "--eval-ref",
                                                                   str(r / "missing.npz")), "missing.npz"),
    "train: --vae that does not decode the model's inputs": (
        train.main, lambda r: train_argv(r, "--vae", str(r / "tiny-vae")),
        "the model takes 3-channel inputs, but the VAE"),
    "train: --results-dir under a file": (train.main, lambda r: train_argv(r, "--results-dir", str(r / "a-file")),
                                          "cannot be created: "),
    "train: --t-max nan": (train.main, lambda r: train_argv(r, "--t-max", "nan"), "--t-max nan: must be a finite"),
    "train: --class-dropout-prob 1.5": (train.main, lambda r: train_argv(r, "--class-dropout-prob", "1.5"),
                                        "--class-dropout-prob 1.5"),
    "train: DiT --t-max too small": (train.main, lambda r: train_argv(r, "--model", "DiT-T/2", "--t-max", "1e-4"),
                                     "leaves no step"),
    "train: unknown REPA encoder": (train.main, lambda r: train_argv(r, "--guidance", "repa", "--repa-encoder",
                                                                     "no-such-vit"), "no-such-vit"),
    "train: REPA weights file missing": (train.main, lambda r: train_argv(
        r, "--guidance", "repa", "--repa-encoder-weights", str(r / "missing.pth")), "missing.pth"),
    "train: --vae that does not exist": (train.main, lambda r: train_argv(r, "--vae", str(r / "no-vae")),
                                         "no-vae"),
    "train: resume with another config": (train.main, lambda r: train_argv(
        r, "--results-dir", str(r / "runs"), "--run-name", "done", "--lr", "1e-3"), "different config"),
    # python -m preprocessing
    "preprocessing: --input missing": (preprocess_main, lambda r: ["--input", str(r / "nope"), "--output",
                                                                   str(r / "p1"), "--vae", "none"], "nope"),
    "preprocessing: --input a file": (preprocess_main, lambda r: ["--input", str(r / "a-file"), "--output",
                                                                  str(r / "p2"), "--vae", "none"], "a-file"),
    "preprocessing: --output a file": (preprocess_main, lambda r: ["--input", str(r / "images"), "--output",
                                                                   str(r / "a-file"), "--vae", "none"], "a-file"),
    "preprocessing: --resolution 0": (preprocess_main, lambda r: ["--input", str(r / "images"), "--output",
                                                                  str(r / "p3"), "--resolution", "0"],
                                      "--resolution"),
    "preprocessing: --batch-size 0": (preprocess_main, lambda r: ["--input", str(r / "images"), "--output",
                                                                  str(r / "p4"), "--batch-size", "0"],
                                      "--batch-size"),
    "preprocessing: --images-per-shard 0": (preprocess_main, lambda r: [
        "--input", str(r / "images"), "--output", str(r / "p5"), "--vae", "none", "--images-per-shard", "0"],
        "--images-per-shard"),
    "preprocessing: rerun with other settings": (preprocess_main, lambda r: [
        "--input", str(r / "images"), "--output", str(r / "data"), "--vae", "none", "--resolution", "16"],
        "other settings"),
    "preprocessing: --vae that does not exist": (preprocess_main, lambda r: [
        "--input", str(r / "images"), "--output", str(r / "p6"), "--vae", str(r / "no-vae")], "no-vae"),
    # python -m evaluations.evaluator
    "evaluator: REF missing": (evaluator_main, lambda r: [str(r / "nope.npz"), str(r / "small.npz")], "nope.npz"),
    "evaluator: SAMPLE missing": (evaluator_main, lambda r: [str(r / "small.npz"), str(r / "nope.npz")],
                                  "nope.npz"),
    "evaluator: float images": (evaluator_main, lambda r: [str(r / "small.npz"), str(r / "floats.npz")],
                                "floats.npz"),
    "evaluator: not an npz": (evaluator_main, lambda r: [str(r / "small.npz"), str(r / "garbage.npz")],
                              "garbage.npz"),
    "evaluator: sizes differ": (evaluator_main, lambda r: [str(r / "small.npz"), str(r / "large.npz"),
                                                           "--num-samples", "8"], "16"),
    "evaluator: too few samples": (evaluator_main, lambda r: [str(r / "small.npz"), str(r / "small.npz")],
                                   "holds 8 images"),
    "evaluator: --batch-size 0": (evaluator_main, lambda r: [str(r / "small.npz"), str(r / "small.npz"),
                                                             "--batch-size", "0"], "--batch-size"),
    # sample_ddp.py
    "sample: --ckpt missing": (sample_main, lambda r: sample_argv(r, "--ckpt", str(r / "nope.pt")), "nope.pt"),
    "sample: --ckpt not a checkpoint": (sample_main, lambda r: sample_argv(r, "--ckpt", str(r / "garbage.npz")),
                                        "garbage.npz"),
    "sample: --num-samples 0": (sample_main, lambda r: sample_argv(r, "--num-samples", "0"), "--num-samples"),
    "sample: --cfg-scale -3": (sample_main, lambda r: sample_argv(r, "--cfg-scale", "-3"), "--cfg-scale"),
    "sample: --model contradicts the file": (sample_main, lambda r: sample_argv(r, "--model", "DiT-T/2"),
                                             "contradicts"),
    "sample: DDPM sampler for SiT": (sample_main, lambda r: sample_argv(r, "--sampler", "ddpm"), "--sampler ddpm"),
    "sample: --guidance-interval 0.8 0.2": (sample_main, lambda r: sample_argv(r, "--guidance-interval", "0.8",
                                                                               "0.2"), "--guidance-interval"),
    "sample: --num-steps 0": (sample_main, lambda r: sample_argv(r, "--num-steps", "0"), "--num-steps"),
    "sample: --seed -1": (sample_main, lambda r: sample_argv(r, "--seed", "-1"), "--seed"),
    "sample: preset of the other family": (sample_main, lambda r: sample_argv(r, "--preset", "dit-xl2-256"),
                                           "DiT"),
    "sample: --vae that does not exist": (sample_main, lambda r: sample_argv(r, "--vae", str(r / "no-vae")),
                                          "no-vae"),
    "sample: output under a file": (sample_main, lambda r: sample_argv(r, "--output-dir", str(r / "a-file" / "x")),
                                    "a-file"),
    # python -m analysis, python -m analysis.curves
    "analysis: --ckpt missing": (analysis_main, lambda r: probe_argv(r, "--ckpt", str(r / "nope.pt")), "nope.pt"),
    "analysis: --blocks 9": (analysis_main, lambda r: probe_argv(r, "--blocks", "9"), "9"),
    "analysis: --times 1.5": (analysis_main, lambda r: probe_argv(r, "--times", "1.5"), "1.5"),
    "analysis: --data-dir not a dataset": (analysis_main, lambda r: probe_argv(r, "--data-dir", str(r / "images")),
                                           "index.json"),
    "analysis: no --ckpt": (analysis_main, lambda r: ["--output-dir", str(r / "probe"), "--blocks", "1",
                                                      "--times", "0"], "--ckpt"),
    "curves: run directory missing": (curves_main, lambda r: [str(r / "nope"), "--output", str(r / "c.png")],
                                      "nope"),
    "curves: run without FID": (curves_main, lambda r: [str(r / "runs" / "done"), "--output", str(r / "c.png")],
                                "FID"),
    # python -m demo
    "demo: --reference-images 15": (demo_main, lambda r: ["--reference-images", "15", "--output-dir",
                                                          str(r / "demo1")], "--reference-images"),
    "demo: --images-per-class 1": (demo_main, lambda r: ["--images-per-class", "1", "--output-dir",
                                                         str(r / "demo2")], "--images-per-class"),
    "demo: --steps 0": (demo_main, lambda r: ["--steps", "0", "--output-dir", str(r / "demo3")], "--steps"),
    "demo: --output-dir a file": (demo_main, lambda r: ["--output-dir", str(r / "a-file")],
                                  "a-file exists and is not a directory"),
    "demo: --output-dir under a file": (demo_main, lambda r: ["--output-dir", str(r / "a-file" / "sub")],
                                        "cannot be created"),
}


def listing(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".verified" not in p.name)


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error_before_anything_is_written(world, case, capsys):
    main, argv, words = CASES[case]
    before = listing(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv(world))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == EXIT_USER_ERROR
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert words in err[0], err[0]
    assert listing(world) == before  # nothing written, nothing removed


def test_the_finished_run_is_untouched(world):
    record = json.loads((world / "runs" / "done" / "config.json").read_text())
    assert record["optim"]["lr"] == 1e-4  # the refused resume left the run as it was
