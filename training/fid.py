"""FID-K of the EMA model during training (`--eval-every`), with the ADM Inception features.

Every process samples its share of the K images, always from the same noise and conditions, so FID-K
curves compare across steps and runs; the pool features are gathered and the main process computes
FID against saved reference statistics (`python -m evaluations.evaluator REF --save-ref-stats OUT`).
"""
import torch

from errors import UserError
from evaluations import (
    InceptionFeatures,
    fid_against_reference,
    images_to_uint8,
    load_reference_statistics,
    statistics_sha256,
)
from evaluations.images import SAVE_STATISTICS_COMMAND, format_size
from models import guided_model_fn

EVAL_SEED = 1  # noise and labels of the FID-K samples (distinct from the sample grids' seed)


def reference_sha256(path) -> str:
    """The identity by content of the reference statistics at `path` (evaluations.statistics_sha256): only
    their arrays are read, never the images an ADM reference batch also holds."""
    return statistics_sha256(load_reference_statistics(path))


class InTrainingFID:
    """`image_size`: (height, width) or side of the decoded images; when given, and the reference file
    records the size its statistics were computed at, the two must agree."""

    def __init__(self, reference_path, num_samples, batch_size, num_steps, sample_shape, draws,
                 accelerator, image_size=None):
        """draws: training.samples.ConditionDraws, the conditions the K samples are drawn with."""
        if num_samples % accelerator.num_processes:
            raise UserError(
                f"--eval-samples {num_samples} is not divisible by {accelerator.num_processes} processes"
            )
        self.reference = load_reference_statistics(reference_path)  # fails before any training step
        if image_size is not None and self.reference.image_size is not None:
            decoded_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            # Inception resizes everything to 299x299, so a mismatch would give a meaningless FID-K
            if decoded_size != self.reference.image_size:
                raise UserError(
                    f"--eval-ref {reference_path}: statistics of {format_size(self.reference.image_size)} "
                    f"images, but this run decodes {format_size(decoded_size)} images; compute them from "
                    f"{format_size(decoded_size)} images with {SAVE_STATISTICS_COMMAND}"
                )
        self.features = InceptionFeatures.load(accelerator.device)
        self.accelerator = accelerator
        self.batch_size, self.num_steps = batch_size, num_steps
        self.sample_shape, self.draws = tuple(sample_shape), draws
        self.share = num_samples // accelerator.num_processes

    def _inputs(self):
        """This process's noise and conditions: (share, C, H, W), (share, ...), the same at every evaluation."""
        generator = torch.Generator().manual_seed(EVAL_SEED * 1_000_003 + self.accelerator.process_index)
        z = torch.randn(self.share, *self.sample_shape, generator=generator)
        return z, self.draws(self.share, generator)

    @torch.no_grad()
    def __call__(self, model, objective, decode):
        """FID-K on the main process (None elsewhere); every process must call it."""
        device = self.accelerator.device
        pools = []
        for z, y in zip(*(part.split(self.batch_size) for part in self._inputs())):
            z, y = z.to(device), y.to(device)
            samples = objective.sample(guided_model_fn(model, y), z, num_steps=self.num_steps)
            pool, _ = self.features(images_to_uint8(decode(samples).clamp(-1, 1)))
            pools.append(pool)
        pool = self.accelerator.gather(torch.cat(pools))  # (K, 2048)
        if not self.accelerator.is_main_process:
            return None
        return fid_against_reference(pool, self.reference)
