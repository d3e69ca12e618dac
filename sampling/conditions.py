"""The condition of every sample index: a class label, or a caption drawn from a captions file.

Like the noise (sampling/seeds.py), the condition of sample i depends on (--seed, i) only, so the same
seed gives the same images and captions whatever the number of processes or the batch size. Each
source hands the sampler the model's condition tensor and a per-index record for the `.npz`: `labels`
for class-conditional models; `caption_index` (into the captions file's list) and the caption texts
(`captions`) for text-conditioned ones.
"""
from pathlib import Path

import numpy as np
import torch

from conditioning import CLASS, Condition

from .seeds import ClassLabels, derived_seed

CAPTION_STREAM = 4  # the caption of sample i (streams 0-3: sampling/seeds.py)


class ClassSource:
    """Labels by index (uniform, or balanced with --balanced-classes), and the null class for guidance."""

    record_key = "labels"

    def __init__(self, seed: int, num_samples: int, num_classes: int, balanced: bool):
        self.labels = ClassLabels(seed, num_samples, num_classes, balanced)
        self.condition = Condition.classes(num_classes)

    def identity(self) -> dict:
        return {}

    def __call__(self, indices) -> tuple[torch.Tensor, np.ndarray]:
        """(labels (n,) int64 on the CPU, the record: the same labels as numpy)."""
        labels = self.labels(indices)
        return labels, labels.numpy()

    def extra_arrays(self, records: np.ndarray) -> dict:
        return {}


class CaptionList:
    """A captions file as a list: images in sorted path order, each image's captions in file order.
    `image_of[k]` is the image of caption k; `first[j]`, `count[j]` the captions of image j."""

    def __init__(self, captions: dict[str, list[str]]):
        images = sorted(captions)
        self.texts = [text for image in images for text in captions[image]]
        self.count = np.array([len(captions[image]) for image in images], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_images(self) -> int:
        return len(self.count)

    def draw(self, seed: int, index: int) -> int:
        """The caption of sample `index`: an image uniformly (every image equally often, as REPA's script
        samples one image per caption draw), then one of its captions uniformly."""
        rng = np.random.default_rng(derived_seed(seed, CAPTION_STREAM, index))
        image = int(rng.integers(self.num_images))
        return int(self.first[image] + rng.integers(self.count[image]))


class CaptionSource:
    """Captions by index from a captions file (COCO's annotation JSON, a JSON mapping or a TSV file,
    preprocessing.captions), encoded by the training run's text encoder and rounded as the dataset stores
    contexts, so the model sees what training saw; the empty caption is the null for guidance."""

    record_key = "caption_index"

    def __init__(self, seed: int, captions_path, encoder):
        from preprocessing.captions import captions_sha256, read_captions
        from preprocessing.text import round_like_stored

        self.seed, self.encoder, self.round = seed, encoder, round_like_stored
        self.path = Path(captions_path)
        self.captions = CaptionList(read_captions(self.path))
        self.captions_sha256 = captions_sha256(self.path)
        self.condition = Condition.text(round_like_stored(encoder.null()))

    def identity(self) -> dict:
        """What decides the captions and contexts, by content: recorded with the samples."""
        return {"captions": str(self.path.resolve()), "captions_sha256": self.captions_sha256,
                "text_encoder": self.encoder.name, "text_encoder_sha256": self.encoder.weights_sha256}

    def __call__(self, indices) -> tuple[torch.Tensor, np.ndarray]:
        """(contexts (n, L, D) float32 on the CPU, the record: each sample's caption index (n,) int64)."""
        chosen = np.array([self.captions.draw(self.seed, index) for index in indices], dtype=np.int64)
        contexts = self.round(self.encoder.encode([self.captions.texts[k] for k in chosen]))
        return contexts, chosen

    def extra_arrays(self, records: np.ndarray) -> dict:
        """The caption text of every sample, as a fixed-width unicode array (readable without pickle)."""
        return {"captions": np.array([self.captions.texts[k] for k in records], dtype=str)}


def condition_source(kind: str, seed: int, num_samples: int, *, num_classes=None, balanced=False,
                     captions=None, encoder=None):
    """The source for a model conditioned on `kind` (conditioning.CLASS or TEXT)."""
    if kind == CLASS:
        return ClassSource(seed, num_samples, num_classes, balanced)
    return CaptionSource(seed, captions, encoder)
