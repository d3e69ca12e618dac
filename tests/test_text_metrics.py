"""Text-to-image evaluation: CLIP score and PickScore (`python -m evaluations.clip_score`) against hand
computations with tiny random CLIP models, their input checks, and the evaluator's --center-crop for
reference statistics of a folder of differently sized images (COCO val2014)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errors import run_cli
from evaluations import clip_score, evaluator
from evaluations.images import load_reference_statistics, open_images
from evaluations.inception import random_fid_inception
from models import weights_sha256
from preprocessing.image import center_crop_adm
from tests.text_fixtures import tiny_clip_dir, tiny_text_encoder_dir

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 6
CAPTIONS = [
    "a red square",
    "A stripe in blue on grey.",
    "green square, centred",
    "a yellow stripe",
    "",  # an empty caption is still a caption
    "a very long caption " * 20,  # beyond 77 tokens: truncated
]
PICKSCORE_LOGIT_SCALE = math.log(100.0)  # PickScore_v1's learned temperature: logit_scale.exp() = 100


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("pickscore") / "pickscore", seed=1, logit_scale=PICKSCORE_LOGIT_SCALE)


@pytest.fixture(scope="module")
def clip(clip_dir):
    """(model, processor) of the tiny CLIP folder, loaded as a user would, independently of the module."""
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)


def sample_images(count=NUM_SAMPLES, seed=0):
    """Random uint8 (count, 40, 48, 3): not square and not the model's 32 px, so the processor resizes and crops."""
    return np.random.default_rng(seed).integers(0, 256, (count, 40, 48, 3), dtype=np.uint8)


def write_samples(path, images=None, captions=CAPTIONS, **extra):
    """A sample .npz as the text-to-image sampler writes it: arr_0, captions (unicode), caption_index."""
    images = sample_images() if images is None else images
    arrays = {"arr_0": images, "captions": np.array(captions), "caption_index": np.arange(len(captions))}
    np.savez(path, **{**arrays, **extra})
    return path


@torch.no_grad()
def cosines_by_hand(model, processor, images, captions):
    """CLIPModel's own forward on the processor's joint call: its image_embeds and text_embeds are the
    projected, L2-normalized embeddings; the cosine of each pair is their row-wise dot product."""
    inputs = processor(
        text=list(captions), images=list(images), padding="max_length", truncation=True, max_length=77,
        return_tensors="pt",
    )
    output = model(**inputs)
    return (output.image_embeds * output.text_embeds).sum(-1).double().numpy(), output


def run(argv, capsys):
    """(exit status or the record, stdout, stderr lines) of `python -m evaluations.clip_score ARGV` in-process."""
    try:
        result = run_cli(clip_score.main, [str(arg) for arg in argv])
    except SystemExit as exit_info:
        result = exit_info.code
    captured = capsys.readouterr()
    return result, captured.out, captured.err.splitlines()


# --- the metrics --------------------------------------------------------------------------------------


def test_clip_score_equals_a_hand_computation(tmp_path, clip, clip_dir, capsys):
    samples = write_samples(tmp_path / "samples.npz")
    record, out, _ = run([samples, "--clip-model", clip_dir, "--device", "cpu", "--batch-size", 4], capsys)
    cosines, _ = cosines_by_hand(*clip, sample_images(), CAPTIONS)
    assert (cosines < 0).any() and (cosines > 0).any()  # the clamp at 0 matters for this data
    scores = 100 * np.maximum(cosines, 0)
    assert record["clip_score"] == pytest.approx(scores.mean(), abs=1e-5)
    assert record["clip_score_standard_error"] == pytest.approx(
        scores.std(ddof=1) / math.sqrt(NUM_SAMPLES), abs=1e-5
    )
    written = json.loads((tmp_path / "samples_text_metrics.json").read_text())
    assert written["clip_score"] == record["clip_score"] and written["num_samples"] == NUM_SAMPLES
    mean, error = record["clip_score"], record["clip_score_standard_error"]
    assert f"CLIP score: {mean:.4f} ± {error:.4f} (mean ± standard error over 6 samples)" in out.splitlines()


def test_image_text_scores_are_the_cosines_of_the_hand_computation(clip):
    images = sample_images()
    cosines = clip_score.image_text_scores(*clip, images, np.array(CAPTIONS), "cpu")
    expected, _ = cosines_by_hand(*clip, images, CAPTIONS)
    assert cosines.shape == (NUM_SAMPLES,) and cosines.dtype == torch.float32
    np.testing.assert_allclose(cosines.double().numpy(), expected, rtol=0, atol=1e-6)


def test_pickscore_is_the_temperature_times_the_cosine_unclamped(tmp_path, clip_dir, pickscore_dir, capsys):
    from transformers import AutoProcessor, CLIPModel

    samples = write_samples(tmp_path / "samples.npz")
    argv = [samples, "--clip-model", clip_dir, "--pickscore-model", pickscore_dir]
    record, out, _ = run([*argv, "--pickscore-processor", clip_dir, "--device", "cpu"], capsys)
    model = CLIPModel.from_pretrained(pickscore_dir).eval()
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    cosines, output = cosines_by_hand(model, AutoProcessor.from_pretrained(clip_dir), sample_images(), CAPTIONS)
    assert (cosines < 0).any()  # no clamp: negative cosines pull the mean down
    scores = 100.0 * cosines
    np.testing.assert_allclose(np.diag(output.logits_per_image.double().numpy()), scores, rtol=1e-5)
    assert record["pickscore"] == pytest.approx(scores.mean(), abs=1e-5)
    assert record["pickscore_standard_error"] == pytest.approx(scores.std(ddof=1) / math.sqrt(NUM_SAMPLES), abs=1e-5)
    assert record["pickscore_note"] is None
    assert record["pickscore_model"] == str(pickscore_dir.resolve())
    assert record["pickscore_processor"] == str(clip_dir.resolve())
    assert record["pickscore_weights_sha256"] == weights_sha256(model.state_dict())
    assert any(line.startswith("PickScore: ") and "±" in line for line in out.splitlines())


def test_batch_size_does_not_change_the_scores(tmp_path, clip_dir, pickscore_dir, capsys):
    samples = write_samples(tmp_path / "samples.npz")
    records = []
    for batch_size in [1, 4, NUM_SAMPLES]:
        argv = [samples, "--clip-model", clip_dir, "--pickscore-model", pickscore_dir, "--pickscore-processor",
                clip_dir, "--device", "cpu", "--batch-size", batch_size]
        records.append(run(argv, capsys)[0])
    for record in records[1:]:
        for key in ["clip_score", "clip_score_standard_error", "pickscore", "pickscore_standard_error"]:
            assert record[key] == pytest.approx(records[0][key], abs=1e-5), key


def test_the_scores_read_the_captions(clip, tmp_path, clip_dir, capsys):
    images = sample_images()
    own = clip_score.image_text_scores(*clip, images, np.array(CAPTIONS), "cpu")
    shuffled = clip_score.image_text_scores(*clip, images, np.roll(np.array(CAPTIONS), 1), "cpu")
    assert (own - shuffled).abs().min() > 1e-4  # every pair changed
    scores = []
    for name, captions in [("own.npz", CAPTIONS), ("shuffled.npz", list(np.roll(CAPTIONS, 1)))]:
        samples = write_samples(tmp_path / name, images, captions)
        scores.append(run([samples, "--clip-model", clip_dir, "--device", "cpu"], capsys)[0]["clip_score"])
    assert abs(scores[0] - scores[1]) > 1e-3


def test_num_samples_scores_the_first_n(tmp_path, clip, clip_dir, capsys):
    samples = write_samples(tmp_path / "samples.npz")
    record, _, _ = run([samples, "--clip-model", clip_dir, "--device", "cpu", "--num-samples", 3], capsys)
    cosines, _ = cosines_by_hand(*clip, sample_images()[:3], CAPTIONS[:3])
    assert record["num_samples"] == 3
    assert record["clip_score"] == pytest.approx((100 * np.maximum(cosines, 0)).mean(), abs=1e-5)


def test_without_a_pickscore_model_pickscore_is_unavailable_never_a_number(tmp_path, clip_dir, capsys):
    samples = write_samples(tmp_path / "samples.npz")
    output = tmp_path / "metrics.json"
    record, out, _ = run([samples, "--clip-model", clip_dir, "--device", "cpu", "--output-json", output], capsys)
    assert (
        "PickScore: unavailable: pass --pickscore-model yuvalkirstain/PickScore_v1 (a hub id or a local copy) "
        "to compute it"
    ) in out.splitlines()
    written = json.loads(output.read_text())
    assert written == record and not (tmp_path / "samples_text_metrics.json").exists()
    assert written["pickscore"] is None and written["pickscore_standard_error"] is None
    assert written["pickscore_note"].startswith("unavailable: pass --pickscore-model ")
    assert written["pickscore_model"] is None and written["pickscore_weights_sha256"] is None


def test_cli_end_to_end_records_models_weights_and_versions(tmp_path, clip, clip_dir, capsys):
    import transformers

    samples = write_samples(tmp_path / "samples.npz")
    record, out, err = run([samples, "--device", "cpu", "--clip-model", clip_dir], capsys)
    lines = out.splitlines()
    assert lines[0].startswith("CLIP score: ") and lines[1].startswith("PickScore: unavailable: ")
    assert lines[2] == f"wrote {tmp_path / 'samples_text_metrics.json'}"
    written = json.loads((tmp_path / "samples_text_metrics.json").read_text())
    assert written == record
    assert written["clip_model"] == written["clip_processor"] == str(clip_dir.resolve())
    assert written["clip_weights_sha256"] == weights_sha256(clip[0].state_dict())
    assert written["samples"] == str(samples) and written["device"] == "cpu"
    assert written["torch"] == torch.__version__ and written["transformers"] == transformers.__version__
    assert "100 * max(cos, 0)" in written["clip_score_definition"]


# --- mistakes -----------------------------------------------------------------------------------------

# Each mistake below ends the command with exit status 2 and one stderr line, `error: ...`, holding the
# fragments, and writes nothing. "{tmp}" is tmp_path, which holds samples.npz (6 images and captions);
# "{clip}" a tiny CLIP folder. Those marked early must be found before any model is loaded.
MISTAKES = {
    "missing SAMPLES": (None, "{tmp}/missing.npz --clip-model {clip}", ["missing.npz: no such file"], True),
    "not an npz": (
        lambda tmp: (tmp / "garbage.npz").write_bytes(b"\x00garbage, not a zip archive"),
        "{tmp}/garbage.npz --clip-model {clip}",
        ["garbage.npz: not an .npz (zip) archive; expected an .npz written by the text-to-image sampler"],
        True,
    ),
    "no captions": (
        lambda tmp: np.savez(tmp / "classes.npz", arr_0=sample_images(), arr_1=np.arange(NUM_SAMPLES)),
        "{tmp}/classes.npz --clip-model {clip}",
        ["classes.npz: this file has no captions: it was sampled from a class-conditional model, or by another tool"],
        True,
    ),
    "no images": (
        lambda tmp: np.savez(tmp / "text.npz", captions=np.array(CAPTIONS)),
        "{tmp}/text.npz --clip-model {clip}",
        ["text.npz: no `arr_0` image array"],
        True,
    ),
    "float images": (
        lambda tmp: write_samples(tmp / "float.npz", sample_images().astype(np.float32)),
        "{tmp}/float.npz --clip-model {clip}",
        ["float.npz[arr_0]: images must be uint8"],
        True,
    ),
    "fewer captions than images": (
        lambda tmp: write_samples(tmp / "short.npz", captions=CAPTIONS[:5]),
        "{tmp}/short.npz --clip-model {clip}",
        ["short.npz: 6 images but 5 captions"],
        True,
    ),
    "captions as an object array": (
        lambda tmp: write_samples(tmp / "objects.npz", captions=np.array(CAPTIONS, dtype=object)),
        "{tmp}/objects.npz --clip-model {clip}",
        ["objects.npz[captions]: not a readable array"],
        True,
    ),
    "captions as bytes": (
        lambda tmp: write_samples(tmp / "bytes.npz", captions=np.array(CAPTIONS, dtype=bytes)),
        "{tmp}/bytes.npz --clip-model {clip}",
        ["bytes.npz[captions]: expected a 1-D unicode string array", "got |S"],
        True,
    ),
    "--num-samples more than available": (
        None,
        "{tmp}/samples.npz --clip-model {clip} --num-samples 7",
        ["samples.npz: holds 6 images, fewer than --num-samples 7; pass --num-samples 6 or leave it out"],
        True,
    ),
    "--num-samples 1": (
        None, "{tmp}/samples.npz --clip-model {clip} --num-samples 1", ["--num-samples 1: at least 2"], True
    ),
    "--batch-size 0": (
        None, "{tmp}/samples.npz --clip-model {clip} --batch-size 0", ["--batch-size 0: at least 1"], True
    ),
    "no --clip-model": (None, "{tmp}/samples.npz", ["the following arguments are required: --clip-model"], True),
    "unknown device": (
        None, "{tmp}/samples.npz --clip-model {clip} --device cude", ["--device cude: not a torch device"], True
    ),
    "device this machine lacks": (
        None, "{tmp}/samples.npz --clip-model {clip} --device cuda:99", ["--device cuda:99"], True
    ),
    "output folder missing": (
        None,
        "{tmp}/samples.npz --clip-model {clip} --output-json {tmp}/nowhere/m.json",
        ["--output-json", "nowhere/m.json: no folder"],
        True,
    ),
    "CLIP model folder missing": (
        None, "{tmp}/samples.npz --clip-model {tmp}/no_model", ["--clip-model", "no_model: no such folder"], True
    ),
    "CLIP model is a file": (
        None, "{tmp}/samples.npz --clip-model {tmp}/samples.npz", ["--clip-model", "samples.npz: a file"], True
    ),
    "a text encoder, not a CLIPModel": (
        lambda tmp: tiny_text_encoder_dir(tmp / "text_encoder"),
        "{tmp}/samples.npz --clip-model {tmp}/text_encoder",
        ["text_encoder: a 'clip_text_model' model; expected a CLIPModel"],
        True,
    ),
    "a folder without a config": (
        lambda tmp: (tmp / "empty").mkdir(),
        "{tmp}/samples.npz --clip-model {tmp}/empty",
        ["--clip-model", "empty: no config.json; expected a model folder"],
        True,
    ),
    "PickScore weights missing": (
        lambda tmp: ((tmp / "config_only").mkdir(), (tmp / "config_only" / "config.json").write_bytes(
            (tmp / "clip" / "config.json").read_bytes())),
        "{tmp}/samples.npz --clip-model {clip} --pickscore-model {tmp}/config_only --pickscore-processor {clip}",
        ["--pickscore-model", "config_only: cannot load the CLIP model (OSError: ", "model.safetensors"],
        False,
    ),
    "PickScore processor missing": (
        None,
        "{tmp}/samples.npz --clip-model {clip} --pickscore-model {clip} --pickscore-processor {tmp}/no_processor",
        ["--pickscore-processor", "no_processor: no such folder"],
        True,
    ),
    "PickScore processor without an image processor": (
        lambda tmp: ((tmp / "config_only").mkdir(), (tmp / "config_only" / "config.json").write_bytes(
            (tmp / "clip" / "config.json").read_bytes())),
        "{tmp}/samples.npz --clip-model {clip} --pickscore-model {clip} --pickscore-processor {tmp}/config_only",
        ["--pickscore-processor", "config_only: cannot load the processor"],
        True,
    ),
}


@pytest.fixture
def mistake_folder(tmp_path, clip_dir):
    """tmp_path with samples.npz and a copy of the tiny CLIP folder, clip/."""
    import shutil

    write_samples(tmp_path / "samples.npz")
    shutil.copytree(clip_dir, tmp_path / "clip")
    return tmp_path


def files_under(folder):
    return sorted(path.relative_to(folder) for path in folder.rglob("*"))


@pytest.mark.parametrize("make, arguments, fragments, early", MISTAKES.values(), ids=MISTAKES.keys())
def test_user_mistakes_are_one_line_errors_and_write_nothing(
    mistake_folder, capsys, monkeypatch, make, arguments, fragments, early
):
    tmp = mistake_folder
    if early:
        monkeypatch.setattr(clip_score, "load_model", lambda *args: pytest.fail("a model was loaded"))
    if make is not None:
        make(tmp)
        capsys.readouterr()  # what making the files printed
    before = files_under(tmp)
    status, out, lines = run(arguments.format(tmp=tmp, clip=tmp / "clip").split(), capsys)
    assert status == 2
    if not early:  # transformers' progress bar of the model loaded before comes first
        lines = [line for line in lines if not line.startswith("Loading weights") and line]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "CLIP score:" not in out and "PickScore:" not in out
    assert files_under(tmp) == before  # nothing written


def test_image_text_scores_refuses_mismatched_inputs(clip):
    with pytest.raises(ValueError, match="uint8"):
        clip_score.image_text_scores(*clip, sample_images().astype(np.float32), np.array(CAPTIONS), "cpu")
    with pytest.raises(ValueError, match="6 images but 5 captions"):
        clip_score.image_text_scores(*clip, sample_images(), np.array(CAPTIONS[:5]), "cpu")


def test_the_module_entry_point_reports_a_user_mistake_in_one_line(tmp_path):
    np.savez(tmp_path / "classes.npz", arr_0=sample_images(2))
    result = subprocess.run(
        [sys.executable, "-m", "evaluations.clip_score", str(tmp_path / "classes.npz"), "--clip-model", "x/y"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path / 'classes.npz'}: this file has no captions: ")
    assert not list(tmp_path.glob("*.json"))


# --- reference statistics of differently sized images: --center-crop -----------------------------------

CROP = 16
FOLDER_SIZES = [(20, 28), (30, 22), (20, 28), (30, 22), (37, 37)]  # (height, width): three sizes, 5 images


def write_mixed_folder(folder, sizes=FOLDER_SIZES, seed=0):
    """One random PNG per (height, width), named 00.png, 01.png, ...; returns the files."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    files = []
    for index, (height, width) in enumerate(sizes):
        files.append(folder / f"{index:02d}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(files[-1])
    return files


def cropped_by_hand(files, size):
    """Each file decoded to RGB by PIL and ADM-center-cropped with the training data's function."""
    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(center_crop_adm(image.convert("RGB"), size))
    return np.stack(images)


@pytest.fixture
def random_inception(monkeypatch):
    """The evaluator with a random-weight Inception (statistics of the same images match whatever the
    weights) and no weight file needed."""
    monkeypatch.setattr(evaluator, "load_fid_inception", lambda path: random_fid_inception(seed=0))
    monkeypatch.setattr(evaluator, "verify_weights_file", lambda path: path)
    monkeypatch.setattr(evaluator, "default_weights_path", lambda: Path("default_1.pt"))


def test_center_crop_gives_the_statistics_of_images_cropped_by_hand(tmp_path, random_inception, capsys):
    files = write_mixed_folder(tmp_path / "val2014")
    np.savez(tmp_path / "cropped.npz", arr_0=cropped_by_hand(files, CROP))
    common = ["--device", "cpu", "--batch-size", "2"]
    evaluator.main([str(tmp_path / "val2014"), "--center-crop", str(CROP), "--save-ref-stats",
                    str(tmp_path / "folder_stats.npz"), *common])
    evaluator.main([str(tmp_path / "cropped.npz"), "--save-ref-stats", str(tmp_path / "npz_stats.npz"), *common])
    from_folder = load_reference_statistics(tmp_path / "folder_stats.npz")
    by_hand = load_reference_statistics(tmp_path / "npz_stats.npz")
    assert from_folder.image_size == by_hand.image_size == (CROP, CROP)
    for name in ["pool", "spatial"]:
        np.testing.assert_array_equal(getattr(from_folder, name).mu, getattr(by_hand, name).mu)
        np.testing.assert_array_equal(getattr(from_folder, name).sigma, getattr(by_hand, name).sigma)


def test_a_cropped_folder_reads_as_the_images_cropped_by_hand(tmp_path):
    files = write_mixed_folder(tmp_path / "samples")
    images = open_images(tmp_path / "samples", crop_size=CROP)
    assert images.num_images == len(files) and images.image_shape == (CROP, CROP, 3)
    np.testing.assert_array_equal(np.concatenate(list(images.batches(2, len(files)))), cropped_by_hand(files, CROP))


def test_without_center_crop_a_folder_of_mixed_sizes_is_still_refused(tmp_path, capsys):
    write_mixed_folder(tmp_path / "val2014")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluator.main, [str(tmp_path / "val2014"), "--save-ref-stats", str(tmp_path / "stats.npz")])
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert line.startswith(f"error: {tmp_path / 'val2014'}: images differ in size (height x width: 00.png is 20x28")
    assert "pass --center-crop N" in line and not (tmp_path / "stats.npz").exists()


@pytest.mark.parametrize(
    "size, arguments, fragment",
    [
        (32, "{tmp}/images.npz --center-crop 16 --save-ref-stats {tmp}/stats.npz",
         "images.npz: --center-crop 16 crops the images of folders only, and this .npz holds 32x32 images"),
        (16, "{tmp}/val2014 {tmp}/images.npz --center-crop 8",
         "images.npz: --center-crop 8 crops the images of folders only, and this .npz holds 16x16 images"),
        (16, "{tmp}/val2014 --center-crop 0 --save-ref-stats {tmp}/stats.npz", "--center-crop 0: the crop size"),
    ],
)
def test_center_crop_refuses_npz_images_of_another_size(tmp_path, capsys, monkeypatch, size, arguments, fragment):
    monkeypatch.setattr(evaluator, "load_fid_inception", lambda path: pytest.fail("Inception work began"))
    write_mixed_folder(tmp_path / "val2014")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((5, size, size, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluator.main, arguments.format(tmp=tmp_path).split())
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and fragment in line, line
    assert not (tmp_path / "stats.npz").exists()


def test_center_crop_accepts_npz_images_already_of_the_crop_size(tmp_path):
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((5, CROP, CROP, 3), np.uint8))
    assert open_images(tmp_path / "images.npz", crop_size=CROP).image_shape == (CROP, CROP, 3)
