"""Representation analysis: block features, noise levels per time convention, the feature cache, linear
probes, PCA pictures and the `python -m analysis` report (CPU, tiny models, generated pixel data)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from analysis import (
    FeatureModel,
    ProbeConfig,
    clean_inputs,
    extract_features,
    load_feature_model,
    make_split,
    pca_panels,
    principal_components,
    run_probe,
    token_features,
    token_pca_rgb,
    top1_accuracy,
    train_linear_probe,
)
from analysis.__main__ import main as analysis_main
from errors import EXIT_USER_ERROR, UserError, run_cli
from preprocessing.__main__ import main as preprocess
from tests.helpers import project_meta, randomize_

CLASSES = 4
IMAGES_PER_CLASS = 64
SIDE = 8
# Class k has a mean colour of its own: classes are linearly separable by the mean of each channel,
# which the pooled patch embedding (a linear map of the mean patch) keeps.
CLASS_COLOURS = np.array([[40, 40, 200], [200, 40, 40], [40, 200, 40], [200, 200, 200]])
PIXEL_NOISE = 30
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: a second thread only waits for a core


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis_data")
    rng = np.random.default_rng(0)
    for label, colour in enumerate(CLASS_COLOURS):
        folder = root / "images" / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(IMAGES_PER_CLASS):
            pixels = np.clip(colour + rng.normal(0, PIXEL_NOISE, (SIDE, SIDE, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    preprocess(["--input", str(root / "images"), "--output", str(root / "pixels"), "--vae", "none",
                "--resolution", str(SIDE), "--num-workers", "0"])
    return str(root / "pixels")


def pixel_model(name="SiT-S/2", seed=0, **options):
    """A 3-block, 32-wide model on 8×8 RGB inputs with the dataset's 4 classes."""
    options = {"depth": 3, "hidden_size": 32, "num_heads": 2, **options}
    model = models.create_model(name, input_size=SIDE, in_channels=3, num_classes=CLASSES, **options)
    return randomize_(model, seed).eval()


def save_checkpoint(path, student, teacher, data_dir, time_convention=models.DATA_AT_0):
    """A file in train.py's format, with the parts the loader reads."""
    meta = project_meta(student, "DiT-S/2" if time_convention == models.DISCRETE_STEPS else "SiT-S/2", data_dir)
    meta["time_convention"] = time_convention
    torch.save({
        "format": models.CHECKPOINT_FORMAT,
        "meta": meta,
        "model": student.state_dict(),
        "ema": teacher.state_dict(),
    }, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir):
    path = tmp_path_factory.mktemp("analysis_ckpt") / "sit.pt"
    return save_checkpoint(path, pixel_model(seed=1), pixel_model(seed=2), data_dir)


def test_block_features_are_the_partial_forward_and_the_embedding():
    model = pixel_model()
    x = torch.randn(3, 3, SIDE, SIDE)
    t = torch.rand(3)
    features = token_features(model, x, t, [0, 1, 3])
    null = torch.full((3,), CLASSES)
    assert torch.equal(features[0], model.x_embedder(x) + model.pos_embed)
    for depth in (1, 3):
        assert torch.equal(features[depth], model.forward_features(x, t, null, depth))
    assert not model.blocks[0]._forward_hooks  # the hooks are removed again


def test_noise_levels_in_each_time_convention(tmp_path, data_dir, checkpoint):
    x0, eps = torch.randn(2, 3, SIDE, SIDE), torch.randn(2, 3, SIDE, SIDE)
    flow = load_feature_model(checkpoint, "ema")
    x_t, t_model = flow.inputs(x0, eps, 0.25)
    assert torch.equal(x_t, 0.75 * x0 + 0.25 * eps) and torch.equal(t_model, torch.full((2,), 0.25))
    assert torch.equal(flow.inputs(x0, eps, 0.0)[0], x0)

    # The SiT release (t = 1 is data): the same x_t, the reversed time.
    release = FeatureModel(flow.model, flow.objective, models.DATA_AT_1, "SiT-S/2", "state_dict", [])
    x_t_release, t_release = release.inputs(x0, eps, 0.25)
    assert torch.equal(x_t_release, x_t) and torch.equal(t_release, torch.full((2,), 0.75))

    dit = pixel_model("DiT-S/2")
    dit_path = save_checkpoint(tmp_path / "dit.pt", dit, dit, data_dir, models.DISCRETE_STEPS)
    x_t, step = load_feature_model(dit_path, "model").inputs(x0, eps, 0.25)
    assert step.dtype == torch.long and step.tolist() == [250, 250]  # round(0.25 · 999)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # SPEC §2
    alpha_bar = torch.cumprod(1 - betas, dim=0)[250]
    expected = (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps).float()
    assert torch.allclose(x_t, expected, atol=1e-6)


def test_probe_separates_classes_and_scores_chance_on_random_labels(tmp_path, checkpoint, data_dir):
    feature_model = load_feature_model(checkpoint, "ema")
    split = make_split(data_dir, val_fraction=0.25)
    train = extract_features(feature_model, split.train, split.train_indices, [0], [0.0], tmp_path / "train",
                             batch_size=64, progress=False)[0, 0.0]
    val = extract_features(feature_model, split.val, split.val_indices, [0], [0.0], tmp_path / "val",
                           batch_size=64, progress=False)[0, 0.0]
    train_x, val_x = torch.from_numpy(np.array(train)), torch.from_numpy(np.array(val))
    assert train_x.shape == (192, 32) and val_x.shape == (64, 32)
    train_y = torch.from_numpy(split.train.labels[split.train_indices])
    val_y = torch.from_numpy(split.val.labels[split.val_indices])
    probe = train_linear_probe(train_x, train_y, CLASSES, ProbeConfig(), progress=False)  # the paper's
    assert top1_accuracy(probe, val_x, val_y) >= 0.95

    generator = torch.Generator().manual_seed(0)
    random_train, random_val = (torch.randint(CLASSES, y.shape, generator=generator)
                                for y in (train_y, val_y))
    probe = train_linear_probe(train_x, random_train, CLASSES, ProbeConfig(), progress=False)
    assert abs(top1_accuracy(probe, val_x, random_val) - 1 / CLASSES) <= 0.1


def test_feature_cache_round_trips_and_resumes(tmp_path, checkpoint, data_dir, monkeypatch):
    feature_model = load_feature_model(checkpoint, "model")
    split = make_split(data_dir, val_fraction=0.25)
    indices = split.val_indices
    blocks, times = [0, 1, 3], [0.0, 0.5]
    options = {"seed": 3, "batch_size": 8, "progress": False}
    straight = extract_features(feature_model, split.val, indices, blocks, times, tmp_path / "a", **options)
    assert sorted(straight) == sorted((b, t) for b in blocks for t in times)
    assert all(array.shape == (64, 32) and array.dtype == np.float32 for array in straight.values())
    # The 0.5-noise features are pooled tokens of this sample's x_t, with the noise of its own seed.
    x0, eps = clean_inputs(split.val, indices[:2], seed=3)
    x_t, t_model = feature_model.inputs(x0, eps, 0.5)
    tokens = token_features(feature_model.model, x_t, t_model, [3])[3]
    assert torch.allclose(torch.from_numpy(np.array(straight[3, 0.5][:2])), tokens.mean(dim=1), atol=1e-6)

    calls = []
    real_forward = type(feature_model.model).forward_features

    def interrupted_forward(self, *args):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("interrupted")  # the run stops during its fourth batch
        return real_forward(self, *args)

    monkeypatch.setattr(type(feature_model.model), "forward_features", interrupted_forward)
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_features(feature_model, split.val, indices, blocks, times, tmp_path / "b", **options)
    progress = json.loads((tmp_path / "b" / "block3_t0.0.progress.json").read_text())
    assert progress["rows"] == 24 and not (tmp_path / "b" / "block3_t0.0.npy").exists()
    monkeypatch.undo()
    resumed = extract_features(feature_model, split.val, indices, blocks, times, tmp_path / "b", **options)
    for key in straight:
        assert np.array_equal(resumed[key], straight[key]), key
    assert sorted(path.name for path in (tmp_path / "b").iterdir() if "partial" in path.name
                  or "progress" in path.name) == []

    # A finished cache is read back without running the model.
    def no_forward(self, *args):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(type(feature_model.model), "forward_features", no_forward)
    reread = extract_features(feature_model, split.val, indices, blocks, times, tmp_path / "a", **options)
    assert all(np.array_equal(reread[key], straight[key]) for key in straight)
    monkeypatch.undo()
    # The noise of sample i depends on (seed, i) only: another batch size gives the same features.
    other = extract_features(feature_model, split.val, indices, blocks, times, tmp_path / "c",
                             **{**options, "batch_size": 5})
    assert all(np.allclose(other[key], straight[key], atol=1e-6) for key in straight)


def test_principal_components_recover_planted_directions():
    generator = torch.Generator().manual_seed(0)
    tokens_count, width = 16, 8
    scores = torch.randn(tokens_count, 3, generator=generator, dtype=torch.float64)
    scores, _ = torch.linalg.qr(scores - scores.mean(dim=0))  # (T, 3) orthonormal, centred columns
    scores = scores * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)  # decreasing variance
    directions, _ = torch.linalg.qr(torch.randn(width, 3, generator=generator, dtype=torch.float64))
    tokens = scores @ directions.T + torch.randn(width, generator=generator, dtype=torch.float64)  # (T, D)
    components = principal_components(tokens)
    largest = scores.gather(0, scores.abs().argmax(dim=0, keepdim=True))
    assert torch.allclose(components, scores * largest.sign(), atol=1e-10)

    tokens = torch.randn(2, 16, 8, generator=generator)
    pictures = token_pca_rgb(tokens, grid=4)
    assert pictures.shape == (2, 4, 4, 3) and pictures.dtype == torch.float32
    flat = pictures.reshape(2, 16, 3)  # each component spans exactly [0, 1] in each picture
    assert torch.equal(flat.amin(dim=1), torch.zeros(2, 3))
    assert torch.equal(flat.amax(dim=1), torch.ones(2, 3))
    assert torch.equal(token_pca_rgb(tokens, grid=4), pictures)


def test_pca_panels_shape_and_determinism(checkpoint, data_dir):
    feature_model = load_feature_model(checkpoint, "ema")
    split = make_split(data_dir, val_fraction=0.25)
    x0, eps = clean_inputs(split.val, split.val_indices[:2], seed=0)
    panels = pca_panels(feature_model, x0, eps, [0, 2, 3], [0.0, 0.5])
    assert panels.shape == (2, 2, 3, 4, 4, 3)  # images, noise levels, blocks, 4×4 tokens, RGB
    assert panels.min() >= 0 and panels.max() <= 1
    assert torch.equal(panels, pca_panels(feature_model, x0, eps, [0, 2, 3], [0.0, 0.5]))


def test_command_writes_table_and_figures(tmp_path, data_dir):
    baseline = save_checkpoint(tmp_path / "baseline.pt", pixel_model(seed=3), pixel_model(seed=4), data_dir)
    sra = save_checkpoint(tmp_path / "sra.pt", pixel_model(seed=5), pixel_model(seed=6), data_dir)
    out = tmp_path / "report"
    argv = ["--ckpt", f"baseline={baseline}", "--ckpt", f"sra={sra}", "--blocks", "0", "1", "3",
            "--times", "0", "0.5", "--output-dir", str(out), "--epochs", "10", "--probe-batch-size", "32",
            "--val-fraction", "0.25",
            "--max-train-samples", "96", "--no-progress"]  # --data-dir: from the checkpoints' config
    report = analysis_main(argv)
    with open(out / "probe.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 * 2 * 3 * 2  # checkpoints × weights × blocks × noise levels
    assert {(r["checkpoint"], r["weights"]) for r in table} == {
        (c, w) for c in ("baseline", "sra") for w in ("ema", "model")}
    assert all(r["train_samples"] == "96" and r["val_samples"] == "64" for r in table)
    saved = json.loads((out / "probe.json").read_text())
    assert saved["results"] == report["results"]
    assert [float(r["top1"]) for r in table] == [r["top1"] for r in report["results"]]
    assert saved["settings"]["data_dir"] == data_dir and saved["settings"]["blocks"] == [0, 1, 3]
    for name in ("probe_baseline.png", "probe_sra.png", "compare.png", "pca.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    # The same command again reads the cached features and reproduces every number.
    assert analysis_main(argv)["results"] == report["results"]


def test_cache_and_report_identify_checkpoints_by_content(tmp_path, data_dir):
    """A checkpoint overwritten in place with another of the same size and the old mtime (cp -p, rsync -a,
    tar x) gets new features, and probe.json records the weights' sha256; moved, it reuses its cache."""
    first = save_checkpoint(tmp_path / "a.pt", pixel_model(seed=1), pixel_model(seed=2), data_dir)
    second = save_checkpoint(tmp_path / "b.pt", pixel_model(seed=3), pixel_model(seed=4), data_dir)
    assert os.path.getsize(first) == os.path.getsize(second)
    cache = tmp_path / "cache"
    options = {"blocks": [1], "times": [0.0], "weights": ["ema"], "val_fraction": 0.25, "max_train_samples": 16,
               "max_val_samples": 8, "probe": ProbeConfig(epochs=1, batch_size=16), "pca_images": 0,
               "cache_dir": cache, "device": "cpu", "progress": False}

    def probe(path, out):
        """probe.json's record of the checkpoint, and the val features of the cache directories it added."""
        before = set(cache.iterdir()) if cache.is_dir() else set()
        report = run_probe({"ck": path}, tmp_path / out, **options)
        added = [d for d in set(cache.iterdir()) - before if d.name.startswith("ck-ema-val-")]
        recorded = json.loads((tmp_path / out / "probe.json").read_text())["settings"]["checkpoints"]["ck"]
        assert recorded == report["settings"]["checkpoints"]["ck"]
        return recorded, [np.load(d / "block1_t0.0.npy") for d in added]

    recorded, (old_features,) = probe(first, "one")
    stat = os.stat(first)
    shutil.copyfile(second, first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what cp -p does
    recorded, added = probe(first, "two")
    assert len(added) == 1 and not np.array_equal(added[0], old_features)  # not the old weights' features
    expected = load_feature_model(second, "ema")
    assert expected.weights_sha256 == models.weights_sha256(expected.model.state_dict())
    assert recorded["weights_sha256"] == {"ema": expected.weights_sha256}
    assert probe(second, "three")[1] == []  # the same weights elsewhere reuse their cache


def test_a_device_this_machine_lacks_is_one_line_before_any_work(tmp_path, data_dir, checkpoint):
    out = tmp_path / "out"
    base = ["--ckpt", checkpoint, "--output-dir", str(out), "--no-progress", "--data-dir", data_dir,
            "--blocks", "1", "--times", "0"]
    missing = f"cuda:{torch.cuda.device_count()}"  # "cuda" itself on a machine without a GPU
    for device, message in (("bogus", "--device bogus: not a torch device"),
                            (missing, f"--device {missing}: this machine has")):
        with pytest.raises(UserError, match=message):
            analysis_main([*base, "--device", device])
    assert not out.exists()


def test_bad_requests_fail_before_any_work(tmp_path, data_dir, checkpoint):
    out = tmp_path / "out"
    base = ["--ckpt", checkpoint, "--output-dir", str(out), "--no-progress", "--data-dir", data_dir]
    one_block = [*base, "--blocks", "1", "--times", "0"]
    rest = one_block[2:]  # without --ckpt

    def refused(argv, message):
        with pytest.raises(UserError, match=message) as error:
            analysis_main(argv)
        assert "\n" not in str(error.value)

    refused([*base, "--blocks", "4", "--times", "0"], "has 3 blocks; block 4 does not exist")
    refused([*base, "--blocks", "1", "--times", "1.5"], r"noise levels must be distinct values in \[0, 1\]")
    refused([*one_block, "--val-fraction", "1.5"], r"--val-fraction must lie in \(0, 1\), got 1.5")
    refused([*one_block, "--max-train-samples", "1"], "the split has 1 train and 26 val samples")
    refused([*one_block, "--max-val-samples", "0"], "--max-val-samples must be positive, got 0")
    refused([*one_block, "--epochs", "0"], "--epochs, --probe-batch-size and --lr must be positive")
    refused([*one_block, "--seed", "-1"], "--seed must be >= 0, got -1")
    refused(["--ckpt", str(tmp_path / "missing.pt"), *rest], f"--ckpt {tmp_path / 'missing.pt'}: no such checkpoint")
    refused([*one_block, "--data-dir", str(tmp_path)], f"{tmp_path} has no index.json: it is not a preprocessed")
    (tmp_path / "a_file").write_text("")
    refused([*one_block, "--cache-dir", str(tmp_path / "a_file")], "--cache-dir .*a_file exists and is not a dir")
    moved = save_checkpoint(tmp_path / "moved.pt", pixel_model(), pixel_model(), str(tmp_path / "gone"))
    refused(["--ckpt", moved, "--output-dir", str(out), "--blocks", "1", "--times", "0"],
            f"trained on {tmp_path / 'gone'}, which is not on this machine; pass --data-dir")
    teacher_only = tmp_path / "teacher_only.pt"
    state = torch.load(checkpoint, weights_only=True)
    del state["model"]
    torch.save(state, teacher_only)
    refused(["--ckpt", str(teacher_only), *rest], "has no 'model' weights")
    no_null = save_checkpoint(tmp_path / "no_null.pt", pixel_model(class_dropout_prob=0.0),
                              pixel_model(class_dropout_prob=0.0), data_dir)
    refused(["--ckpt", no_null, *rest], "no null class")
    latent = models.create_model("SiT-S/2", input_size=SIDE, in_channels=4, num_classes=CLASSES, depth=3,
                                 hidden_size=32, num_heads=2)
    latent_path = save_checkpoint(tmp_path / "latent.pt", latent, latent, data_dir)
    refused(["--ckpt", latent_path, *rest], r"takes inputs of shape \[4, 8, 8\], the dataset holds \[3, 8, 8\]")
    refused(["--ckpt", checkpoint, *one_block], "two checkpoints are named 'sit'")
    assert not out.exists()
    refused([*one_block, "--output-dir", str(tmp_path / "a_file")], "--output-dir .*a_file exists and is not a dir")


def test_a_mistake_on_the_command_line_is_one_line_and_exit_status_2(tmp_path, capsys):
    command = [sys.executable, "-m", "analysis", "--ckpt", "missing.pt", "--data-dir", "X", "--output-dir", "out",
               "--blocks", "1", "--times", "0"]
    result = subprocess.run(command, check=False, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == "error: --ckpt missing.pt: no such checkpoint file\n"
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # flags left out: one line as well, not argparse's usage block
        run_cli(analysis_main, ["--ckpt", "missing.pt", "--data-dir", "X"])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == (
        "error: the following arguments are required: --output-dir, --blocks, --times (see --help)\n")
