"""Where the demo's stages put their outputs, under one directory (default results/demo)."""
from pathlib import Path

from preprocessing.store import INDEX_FILE
from training.checkpoints import checkpoint_path

RUNS = {"baseline": "none", "sra": "sra"}  # run name -> train.py --guidance; everything else is shared


class DemoPaths:
    def __init__(self, root):
        self.root = Path(root)
        self.settings = self.root / "demo.json"  # the demo's flags; a rerun must match them
        self.stage_times = self.root / "stages.json"
        self.images = self.root / "data" / "shapes"  # one PNG folder per class
        self.dataset = self.root / "data" / "dataset"  # python -m preprocessing output (pixels)
        self.dataset_index = self.dataset / INDEX_FILE  # written last: the dataset is complete
        self.reference_images = self.root / "reference" / "images.npz"  # held-out arr_0 + labels
        self.reference_stats = self.root / "reference" / "stats.npz"  # mu, sigma, mu_s, sigma_s
        self.runs = self.root / "runs"
        self.samples = self.root / "samples"
        self.probe = self.root / "probe"
        self.classifier = self.root / "classifier.json"  # the samples' class shares (demo/classifier.py)
        self.report = self.root / "report.md"

    def run_dir(self, run):
        return self.runs / run

    def checkpoint(self, run, step):
        return checkpoint_path(self.run_dir(run) / "checkpoints", step)

    def sample_npz(self, run):
        return self.samples / f"{run}.npz"

    def sample_metrics(self, run):
        """The evaluator's JSON, written beside the samples."""
        return self.samples / f"{run}_metrics.json"

    def figure(self, name):
        return self.root / name
