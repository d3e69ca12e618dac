"""Text to image at tiny size (SPEC §8): the conditioning concept's exact properties, and the whole path
captions → dataset → MMDiT + SRA training → sampling with captions → FID and CLIP score, with a tiny random
CLIP text encoder and generated captioned images."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_
from text_fixtures import tiny_clip_dir, tiny_text_encoder_dir, write_captioned_images

import models
import sample_ddp
import sampling
import train
from conditioning import Condition, as_condition
from errors import UserError
from guidance import GuidanceContext, Student, TrainingLoss
from sra.method import SRA, SRAConfig
from training.checkpoints import read_checkpoint
from transport import FlowObjective

REPO = Path(__file__).resolve().parents[1]
CONTEXT = (77, 16)  # the tiny text encoder's contexts: CLIP's 77 tokens, width 16
TRAIN = ["--preset", "mmdit-coco-sra", "--model", "MMDiT-D6/2", "--global-batch-size", "4", "--mixed-precision",
         "no", "--num-workers", "0", "--tensorboard", "off", "--log-every", "1", "--ckpt-every", "2",
         "--sample-every", "0", "--ema-decay", "0.9", "--milestone-every", "0"]


def tiny_mmdit(seed=0, **options):
    options = {"depth": 3, "hidden_size": 32, "num_heads": 2, "context_dim": CONTEXT[1], **options}
    return randomize_(models.create_model("MMDiT-D6/2", input_size=8, in_channels=4, **options), seed, std=0.1)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the condition: one concept for labels and contexts -------------------------------------------

def test_class_dropout_is_the_old_label_dropout_and_text_drops_whole_contexts():
    labels = torch.arange(64) % 10
    classes = Condition.classes(10)
    for seed in range(3):
        dropped = classes.drop(labels, 0.3, torch.Generator().manual_seed(seed))
        assert torch.equal(dropped, models.drop_labels(labels, 0.3, 10, torch.Generator().manual_seed(seed)))
    null = torch.randn(*CONTEXT)
    contexts = torch.randn(64, *CONTEXT)
    text = Condition.text(null)
    dropped = text.drop(contexts, 0.3, torch.Generator().manual_seed(0))
    # the same samples are dropped as the labels with the same generator: one uniform draw per sample
    where = classes.drop(labels, 0.3, torch.Generator().manual_seed(0)) == 10
    assert 0 < where.sum() < 64
    assert torch.equal(dropped[where], null.expand(int(where.sum()), *CONTEXT))
    assert torch.equal(dropped[~where], contexts[~where])
    assert torch.equal(text.drop(contexts, 0.0), contexts)
    assert torch.equal(text.null_like(contexts[:3]), null.expand(3, *CONTEXT))
    assert as_condition(7).num_classes == 7 and as_condition(text) is text
    assert classes.model_options(0.1) == {"num_classes": 10, "class_dropout_prob": 0.1}
    assert text.model_options(0.1) == {"num_classes": 0, "context_dim": CONTEXT[1]}
    with pytest.raises(ValueError):
        Condition.text(torch.zeros(3))


def test_the_teacher_sees_the_students_dropped_context():
    """SRA's teacher is conditioned on exactly the contexts the student saw, nulls included (SPEC §3 step 4)."""
    torch.manual_seed(0)
    backbone, teacher = tiny_mmdit(0), tiny_mmdit(1).eval()
    objective = FlowObjective()
    config = SRAConfig(student_depth=1, teacher_depth=2)
    method = SRA(config, GuidanceContext(objective, teacher, backbone, torch.device("cpu")))
    student = Student(backbone, method.build_head(backbone.hidden_size), 1)
    null = torch.randn(*CONTEXT)
    seen = {}
    forward, features = backbone.forward_with_features, teacher.forward_features
    backbone.forward_with_features = lambda x, t, y, *rest: seen.setdefault("student", y) is None or forward(
        x, t, y, *rest)
    teacher.forward_features = lambda x, t, y, *rest: seen.setdefault("teacher", y) is None or features(x, t, y, *rest)
    loss = TrainingLoss(objective, 0.5, Condition.text(null), method)
    contexts = torch.randn(16, *CONTEXT)
    terms = loss(student, torch.randn(16, 4, 8, 8), contexts, weight=0.2)
    assert torch.isfinite(terms["loss"])
    assert torch.equal(seen["student"], seen["teacher"])
    dropped = (seen["student"] == null).flatten(1).all(dim=1)
    kept = (seen["student"] == contexts).flatten(1).all(dim=1)
    assert dropped.any() and kept.any() and bool((dropped ^ kept).all())


def test_guidance_mixes_with_the_empty_captions_prediction():
    model = tiny_mmdit(2).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    y, null = torch.randn(3, *CONTEXT), torch.randn(*CONTEXT)
    nulls = null.expand(3, *CONTEXT)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, nulls)
        guided = models.guided_model_fn(model, y, scale=3.0, null=nulls)(x, t, 0.5)
        outside = models.guided_model_fn(model, y, scale=3.0, interval=(0.0, 0.4), null=nulls)(x, t, 0.5)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=0)
    assert torch.equal(outside, cond)
    with pytest.raises(ValueError, match="null condition"):
        models.guided_model_fn(model, y, scale=3.0)


def test_caption_draws_depend_on_seed_and_index_only():
    captions = sampling.CaptionList({"b.png": ["b0"], "a.png": ["a0", "a1", "a2"], "c.png": ["c0", "c1"]})
    assert captions.texts == ["a0", "a1", "a2", "b0", "c0", "c1"]
    draws = [captions.draw(0, index) for index in range(3000)]
    assert draws[:50] == [captions.draw(0, index) for index in range(50)]
    assert draws[:50] != [captions.draw(1, index) for index in range(50)]
    images = np.searchsorted(captions.first, draws, side="right") - 1
    shares = np.bincount(images, minlength=3) / len(draws)
    assert np.abs(shares - 1 / 3).max() < 0.03  # each image equally often, whatever its caption count
    assert set(draws) == set(range(6))


# --- the whole path ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from preprocessing.__main__ import main as preprocess

    root = tmp_path_factory.mktemp("coco")
    encoder = tiny_text_encoder_dir(root / "clip-text", width=CONTEXT[1])
    captions = write_captioned_images(root / "train2014", count=12, size=8)
    preprocess(["--input", str(root / "train2014"), "--captions", str(captions), "--text-encoder", str(encoder),
                "--output", str(root / "coco8"), "--vae", "none", "--resolution", "8", "--num-workers", "0"])
    return {"root": root, "encoder": encoder, "captions": captions, "data": str(root / "coco8")}


def train_run(coco, results, *flags):
    return train.main([*TRAIN, "--data-dir", coco["data"], "--results-dir", str(results), *flags])


@pytest.fixture(scope="module")
def trained(coco, tmp_path_factory):
    results = tmp_path_factory.mktemp("runs")
    result = train_run(coco, results, "--max-steps", "4", "--sample-every", "4")
    return {"result": result, "run": results / "mmdit-coco-sra"}


def test_a_text_run_records_its_condition_and_samples_a_grid(trained):
    record, run_dir = trained["result"]["record"], trained["run"]
    assert record["data"]["condition"] == "text" and record["data"]["context_shape"] == list(CONTEXT)
    assert record["data"]["text_encoder"].endswith("clip-text") and len(record["data"]["text_encoder_sha256"]) == 64
    assert record["guidance"]["student_depth"] == 2 and record["guidance"]["teacher_depth"] == 5  # the ¼/¾ rule
    state = read_checkpoint(run_dir / "checkpoints" / "step_0000004.pt")
    assert state["meta"]["condition"]["condition"] == "text"
    assert state["meta"]["model"]["name"] == "MMDiT-D6/2" and state["meta"]["model"]["options"]["context_dim"] == 16
    assert (run_dir / "samples_0000004.png").stat().st_size > 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and all(line["align"] > 0 for line in lines)


def test_a_resumed_text_run_is_bit_identical(coco, trained, tmp_path):
    train_run(coco, tmp_path, "--max-steps", "2")
    resumed = train_run(coco, tmp_path, "--max-steps", "4")
    straight = trained["result"]
    for a, b in [(straight["student"], resumed["student"]), (straight["ema"].model, resumed["ema"].model)]:
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(pa, pb), name


def sample(coco, trained, out, *flags):
    ckpt = trained["run"] / "checkpoints" / "step_0000004.pt"
    return sample_ddp.main(["--ckpt", str(ckpt), "--captions", str(coco["captions"]), "--vae", "none",
                            "--num-samples", "6", "--num-steps", "3", "--cfg-scale", "2", "--output-dir", str(out),
                            *flags])


def test_sampling_with_captions_records_each_samples_caption(coco, trained, tmp_path):
    from preprocessing.captions import read_captions

    by_four = sample(coco, trained, tmp_path / "a", "--per-proc-batch-size", "4")
    by_six = sample(coco, trained, tmp_path / "b", "--per-proc-batch-size", "6")
    assert digest(by_four["npz"]) == digest(by_six["npz"])
    with np.load(by_four["npz"]) as npz:  # no pickle: the texts are a fixed-width unicode array
        assert npz["arr_0"].shape == (6, 8, 8, 3) and npz["captions"].dtype.kind == "U"
        captions = sampling.CaptionList(read_captions(coco["captions"]))
        assert npz["caption_index"].tolist() == [captions.draw(0, index) for index in range(6)]
        assert npz["captions"].tolist() == [captions.texts[k] for k in npz["caption_index"]]
    settings = by_four["settings"]
    assert settings["text_encoder_sha256"] and settings["captions_sha256"]
    # the images depend on the captions: another seed draws other captions and noise
    other = sample(coco, trained, tmp_path / "c", "--seed", "1")
    assert digest(other["npz"]) != digest(by_four["npz"])


def test_two_processes_draw_the_same_captions_and_noise_as_one(coco, trained, tmp_path):
    one = sample(coco, trained, tmp_path / "one", "--per-proc-batch-size", "2")
    ckpt = trained["run"] / "checkpoints" / "step_0000004.pt"
    flags = ["--ckpt", str(ckpt), "--captions", str(coco["captions"]), "--vae", "none", "--num-samples", "6",
             "--num-steps", "3", "--cfg-scale", "2", "--per-proc-batch-size", "2",
             "--output-dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "sample_ddp.py"), *flags]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert digest(tmp_path / "two" / one["npz"].name) == digest(one["npz"])


def test_fid_and_clip_score_of_text_samples(coco, trained, tmp_path, capsys):
    from evaluations import clip_score, evaluator

    result = sample(coco, trained, tmp_path)
    reference = str(coco["root"] / "train2014")  # the real images, center-cropped to the samples' size
    metrics = evaluator.main([reference, str(result["npz"]), "--num-samples", "6", "--center-crop", "8",
                              "--device", "cpu"])
    assert np.isfinite(metrics["fid"])
    clip = tiny_clip_dir(tmp_path / "clip", image_size=8)
    scores = clip_score.main([str(result["npz"]), "--clip-model", str(clip), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "CLIP score" in out and "PickScore" in out
    assert scores is not None


def test_conditions_that_do_not_fit_are_refused(coco, trained, tmp_path, data_dir):
    with pytest.raises(UserError, match="conditioned on text but .* holds class-conditioned samples"):
        train.main([*TRAIN, "--data-dir", data_dir, "--results-dir", str(tmp_path), "--max-steps", "1"])
    with pytest.raises(UserError, match="conditioned on class but .* holds text-conditioned samples"):
        train.main(["--preset", "debug", "--data-dir", coco["data"], "--results-dir", str(tmp_path)])
    with pytest.raises(UserError, match="--mask-ratio applies to SiT models, not MMDiT-D6/2"):
        train.main([*TRAIN, "--data-dir", coco["data"], "--mask-ratio", "0.25", "--dual-time-scheduling", "on"])
    ckpt = str(trained["run"] / "checkpoints" / "step_0000004.pt")
    with pytest.raises(UserError, match="pass --captions"):
        sample_ddp.main(["--ckpt", ckpt, "--vae", "none", "--output-dir", str(tmp_path)])
    other = tiny_text_encoder_dir(tmp_path / "other-encoder", width=CONTEXT[1], seed=1)
    with pytest.raises(UserError, match="has other weights"):
        sample_ddp.main(["--ckpt", ckpt, "--vae", "none", "--captions", str(coco["captions"]), "--text-encoder",
                         str(other), "--output-dir", str(tmp_path)])
    with pytest.raises(UserError, match="--balanced-classes is for class-conditional"):
        sample_ddp.main(["--ckpt", ckpt, "--vae", "none", "--captions", str(coco["captions"]), "--balanced-classes",
                         "--output-dir", str(tmp_path)])
    assert not list(tmp_path.glob("*.npz"))


def test_the_class_probes_refuse_a_text_model(coco, trained, tmp_path):
    from analysis.__main__ import main as analysis_main

    ckpt = trained["run"] / "checkpoints" / "step_0000004.pt"
    with pytest.raises(UserError, match="conditioned on text; the probes predict class labels"):
        analysis_main(["--ckpt", f"mmdit={ckpt}", "--blocks", "1", "--times", "0", "--output-dir",
                       str(tmp_path / "report"), "--no-progress"])
    assert not (tmp_path / "report").exists()


def test_grids_and_fid_during_training_draw_training_captions(coco):
    from conditioning import of_dataset
    from preprocessing.dataset import LatentDataset
    from training.samples import ConditionDraws, grid_inputs

    dataset = LatentDataset(coco["data"])
    condition = of_dataset(dataset)
    assert condition.kind == "text" and torch.equal(condition.null, dataset.null_context())
    draws = ConditionDraws(condition, dataset)
    y = draws(5, torch.Generator().manual_seed(3))
    indices = torch.randint(0, len(dataset), (5,), generator=torch.Generator().manual_seed(3)).tolist()
    assert y.dtype == torch.float32 and torch.equal(y, dataset.get_batch(indices, epochs=[0] * 5)[1].float())
    z, grid_y = grid_inputs(4, dataset.meta["sample_shape"], draws, "cpu")
    assert z.shape == (4, 3, 8, 8) and grid_y.shape == (4, *CONTEXT)
    assert torch.equal(grid_inputs(4, dataset.meta["sample_shape"], draws, "cpu")[1], grid_y)  # fixed per run
