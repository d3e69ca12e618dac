"""A sample-quality number for the demo: the share of generated samples that a small classifier, trained
on the demo's real training images, assigns to the class they were sampled for.

Two classifiers, because each class has its own hue (demo/dataset.py) and colour alone would name the
class: one sees the RGB image (colour and shape), the other only each pixel's brightness, max(R, G, B),
standardized per image, which is the same for every hue, so it must recognize the shape (or the stripes
and checkerboard). Both are small CNNs trained once, on one CPU thread, in seconds; their accuracy on
held-out real images (images the training and the FID reference never use) says how far their verdict
on samples can be trusted.
"""
import contextlib
import math

import numpy as np
import torch
from torch import nn

from demo import dataset

VIEWS = {"rgb": "colour and shape", "shape": "shape alone (brightness, no hue)"}
HELD_OUT_PER_CLASS = 50  # real images per class the classifiers are scored on
STEPS = 200  # optimizer steps: ~13 epochs of the 1,000 training images; ~1.5 s per classifier on 1 thread
BATCH_SIZE = 64
LR = 3e-3  # Adam; measured: 99.6-100% held-out accuracy after 160 steps
WIDTHS = (16, 32, 32)  # conv channels; two 2× poolings and a global max: position does not matter
# The classifiers' own seed, not the demo's --seed: the same measuring instrument for runs of every seed.
SEED = 0


def view(images: np.ndarray, kind: str) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, C, H, W), each image standardized; C = 3 (rgb) or 1 (shape:
    max over the channels, the HSV value, which does not depend on the hue)."""
    x = torch.from_numpy(np.asarray(images)).float().div(255).permute(0, 3, 1, 2)
    if kind == "shape":
        x = x.amax(dim=1, keepdim=True)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    return x / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)  # a flat image stays flat


def make_network(channels: int) -> nn.Module:
    a, b, c = WIDTHS
    return nn.Sequential(
        nn.Conv2d(channels, a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, a, H/2, W/2)
        nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, b, H/4, W/4)
        nn.Conv2d(b, c, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),  # (N, c)
        nn.Linear(c, dataset.NUM_CLASSES),
    )


@contextlib.contextmanager
def one_thread():
    """Small convolutions run fastest on one thread, and far faster than on two on a busy machine
    (measured: about 40× at load 4 on 2 cores, where the two threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(images, labels, kind, seed=0) -> nn.Module:
    """A classifier of `view(images, kind)`, trained from a fixed seed; the global RNG is left alone."""
    x, y = view(images, kind), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        network = make_network(x.shape[1])
        optimizer = torch.optim.Adam(network.parameters(), lr=LR)
        order = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(STEPS):
            if not batches:
                batches = list(torch.randperm(len(x), generator=order).split(BATCH_SIZE))
            batch = batches.pop(0)
            loss = nn.functional.cross_entropy(network(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return network.eval()


@torch.no_grad()
def predict(network, images, kind) -> np.ndarray:
    with one_thread():
        return network(view(images, kind)).argmax(dim=1).numpy()


def share(predicted, labels) -> dict:
    """The share of predictions equal to their label, with its binomial standard error sqrt(p(1-p)/n),
    and the share per class (None where a class has no sample)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    hits = predicted == labels
    p, n = float(hits.mean()), len(hits)
    per_class = [float(hits[labels == c].mean()) if (labels == c).any() else None
                 for c in range(dataset.NUM_CLASSES)]
    return {"share": p, "stderr": math.sqrt(p * (1 - p) / n), "n": n, "per_class": per_class}


def held_out_images(settings):
    """Real images no stage uses: after the training images and the FID reference images of each class."""
    start = settings["images_per_class"] + settings["reference_images"] // dataset.NUM_CLASSES
    return dataset.draw_many(HELD_OUT_PER_CLASS, settings["dataset_seed"], settings["resolution"], start=start)


def score(settings, samples: dict) -> dict:
    """Train both classifiers on the training images and score them on held-out real images and on each
    run's samples ({run: (images, labels)}). JSON-ready."""
    # The training folder's images, drawn again: draw_many gives them byte for byte (demo/dataset.py).
    train_images, train_labels = dataset.draw_many(settings["images_per_class"], settings["dataset_seed"],
                                                   settings["resolution"])
    real_images, real_labels = held_out_images(settings)
    result = {"views": VIEWS, "train_images": len(train_images), "held_out_images": len(real_images),
              "steps": STEPS, "batch_size": BATCH_SIZE, "lr": LR, "seed": SEED, "chance": 1 / dataset.NUM_CLASSES,
              "held_out": {}, "runs": {run: {} for run in samples}}
    for kind in VIEWS:
        network = train(train_images, train_labels, kind, seed=SEED)
        result["held_out"][kind] = share(predict(network, real_images, kind), real_labels)
        for run, (images, labels) in samples.items():
            result["runs"][run][kind] = share(predict(network, images, kind), labels)
    return result
