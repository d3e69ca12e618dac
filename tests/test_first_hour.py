"""What a new user meets first: help that shows every default, outputs under results/, plots
that name what they show, and the demo's sample classifier."""
import contextlib
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import models
import sample_ddp
import train
from analysis import curves, plots
from analysis.__main__ import main as analysis_main
from demo import classifier, dataset
from demo.__main__ import main as demo_main
from evaluations import clip_score, evaluator
from preprocessing.__main__ import main as preprocessing_main
from tests.helpers import project_meta, randomize_

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {  # usage prefix: the command a user types
    "train.py": train.main,
    "sample_ddp.py": sample_ddp.main,
    "python -m preprocessing": preprocessing_main,
    "python -m evaluations.evaluator": evaluator.main,
    "python -m evaluations.clip_score": clip_score.main,
    "python -m analysis": analysis_main,
    "python -m analysis.curves": curves.main,
    "python -m demo": demo_main,
}


def help_text(main, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one line per usage group; help wraps less
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return printed.getvalue()


def option_entries(text) -> dict:
    """{flag: its help, on one line} for every option in every section of argparse's help."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):  # an option: "  -h, --help ..." or "  --flag METAVAR  help"
            flags = re.findall(r"(?:^|, )(--?[\w-]+)", line.strip().split("  ")[0])
            current = flags[-1]
            entries[current] = line.strip()
        elif current is not None and line.startswith(" " * 4):  # its help, continued
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def optional_in_usage(text, flag) -> bool:
    usage = text.split("\n\n")[0]
    return re.search(rf"\[{re.escape(flag)}[\] ]", usage) is not None


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_every_flag_shows_its_default_or_says_required(command, monkeypatch):
    text = help_text(ENTRY_POINTS[command], monkeypatch)
    assert text.startswith(f"usage: {command} [-h]")
    entries = option_entries(text)
    assert len(entries) > 2 and "--help" in entries
    for flag, entry in entries.items():
        if flag == "--help":
            continue
        if optional_in_usage(text, flag):
            assert "(default: " in entry, f"{command} {flag}: no default shown: {entry}"
        else:
            assert "(required)" in entry, f"{command} {flag} is required, and its help does not say so: {entry}"


def test_the_help_check_fails_on_a_flag_without_its_default(monkeypatch):
    """The parsing above finds a flag that lacks both marks (so the test can fail)."""
    from errors import ArgumentParser

    def main(argv):
        parser = ArgumentParser(prog="sample_ddp.py")
        parser.add_argument("--shown", default=1, help="a flag (default: 1)")
        parser.add_argument("--needed", required=True, help="another (required)")
        parser.add_argument("--bare", type=int, help="no default said")
        parser.parse_args(argv)

    text = help_text(main, monkeypatch)
    entries = option_entries(text)
    assert set(entries) == {"--help", "--shown", "--needed", "--bare"}
    assert optional_in_usage(text, "--shown") and not optional_in_usage(text, "--needed")
    assert "(default: " not in entries["--bare"] and "(required)" in entries["--needed"]


# --- where outputs go ----------------------------------------------------------------------------

def pixel_checkpoint(path: Path) -> Path:
    """A tiny pixel-space SiT checkpoint, as train.py writes its metadata."""
    model = randomize_(models.create_model("SiT-S/2", input_size=8, in_channels=3, num_classes=10,
                                           depth=2, hidden_size=32, num_heads=2))
    torch.save({"format": models.CHECKPOINT_FORMAT, "meta": project_meta(model, "SiT-S/2"),
                "ema": model.state_dict()}, path)
    return path


def test_sample_ddp_writes_under_results_by_default_and_prints_its_settings_once(tmp_path, monkeypatch, capsys):
    checkpoint = pixel_checkpoint(tmp_path / "tiny.pt")
    monkeypatch.chdir(tmp_path)
    result = sample_ddp.main(["--ckpt", str(checkpoint), "--vae", "none", "--num-samples", "2",
                              "--num-steps", "2"])
    assert result["npz"].parent == Path("results/samples") and (tmp_path / result["npz"]).is_file()
    assert not (tmp_path / "samples").exists()
    printed = capsys.readouterr().out
    assert printed.count("settings: ") == 1 and "{" not in printed  # one line, not a JSON block
    assert f"all of them in {result['npz'].with_suffix('.json')} when done" in printed
    # results/ is git-ignored, so the samples never show up as files to commit
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/samples/x.npz"], cwd=REPO)
    assert ignored.returncode == 0
    old_place = sample_ddp.main(["--ckpt", str(checkpoint), "--vae", "none", "--num-samples", "2",
                                 "--num-steps", "2", "--output-dir", "samples"])  # the former default
    assert (tmp_path / old_place["npz"]).is_file() and old_place["npz"].parent == Path("samples")


# --- figures name what they show ----------------------------------------------------------------

def test_probe_panels_name_the_weights_not_a_teacher(tmp_path):
    rows = [{"checkpoint": "baseline", "weights": weights, "block": block, "t": 0.0, "top1": 0.5}
            for weights in ("ema", "model") for block in (0, 1)]
    figure = plots.plot_checkpoint(rows, "baseline", tmp_path / "probe.png", chance=0.1)
    assert [axes.get_title() for axes in figure.axes] == ["EMA weights", "online weights"]


def test_the_pca_picture_says_how_to_read_it(tmp_path):
    panels = {"sra": torch.rand(1, 1, 2, 2, 2, 3)}  # 1 image, 1 noise level, 2 blocks, 2×2 tokens
    inputs = {"sra": torch.rand(1, 1, 4, 4, 3)}
    figure = plots.save_pca_figure(panels, inputs, [1, 2], [0.0], tmp_path / "pca.png")
    caption = " ".join(figure.get_suptitle().split())
    assert "first three principal components" in caption and "EMA weights" in caption
    assert "Figure 2" in caption and (tmp_path / "pca.png").stat().st_size > 0


# --- the demo's sample classifier -----------------------------------------------------------------

DEMO_SETTINGS = {"images_per_class": 100, "reference_images": 150, "dataset_seed": 0, "resolution": 16}


def test_classifiers_recognize_held_out_real_images():
    """Measured: 100% (rgb) and 99.4% (shape alone) of 500 held-out images; 3-10 s on 2 cores, by load."""
    images, labels = dataset.draw_many(5, start=100)  # FID reference images stand in for samples
    result = classifier.score(DEMO_SETTINGS, {"real": (images, labels)})
    assert result["held_out_images"] == 500 and result["train_images"] == 1000
    assert result["held_out"]["rgb"]["share"] >= 0.98
    assert result["held_out"]["shape"]["share"] >= 0.97
    assert result["runs"]["real"]["shape"]["n"] == 50


def test_the_shape_view_is_blind_to_hue():
    images, _ = dataset.draw_many(1)
    rotated = images[..., [1, 2, 0]]  # another hue for every pixel, the same brightness
    assert torch.equal(classifier.view(rotated, "shape"), classifier.view(images, "shape"))
    assert not torch.equal(classifier.view(rotated, "rgb"), classifier.view(images, "rgb"))


def test_share_and_its_standard_error():
    result = classifier.share([0, 1, 1, 3], [0, 1, 2, 3])
    assert result["share"] == 0.75 and result["n"] == 4
    assert result["stderr"] == pytest.approx(np.sqrt(0.75 * 0.25 / 4))
    assert result["per_class"][:4] == [1.0, 1.0, 0.0, 1.0] and result["per_class"][4] is None


def test_held_out_images_are_neither_training_nor_reference_images():
    images, labels = classifier.held_out_images({**DEMO_SETTINGS, "images_per_class": 3, "reference_images": 20})
    assert np.array_equal(images[0], dataset.draw(0, 3 + 2)) and labels[0] == 0
