"""One optimizer step of the training loop."""
import contextlib

import torch

from conditioning import to_model_input
from preprocessing.dataset import sample_model_input
from training.parallel import no_sync, whole


def train_step(batches, meta, loss_fn, trained, optimizer, scaler, accelerator, weight, max_grad_norm):
    """One optimizer step over the micro-batches in `batches` ((x, y) or (x, y, images) each; y labels or
    text contexts). Returns device tensors only (no host sync): the summed loss terms (loss, gen, align) averaged over
    micro-batches, the grad norm, and whether the step was applied (all gradients finite)."""
    accum = len(batches)
    totals = None
    for index, (x, y, *images) in enumerate(batches):
        x0 = sample_model_input(x.to(accelerator.device, non_blocking=True), meta)
        y = to_model_input(y, accelerator.device)
        images = images[0].to(accelerator.device, non_blocking=True) if images else None
        # Gradients are all-reduced only on the last micro-batch.
        sync = contextlib.nullcontext() if index == accum - 1 else no_sync(trained, accelerator)
        with sync, accelerator.autocast():
            terms = loss_fn(trained, x0, y, weight, images)
            accelerator.backward(terms["loss"] / accum)
        detached = torch.stack([terms["loss"].detach(), terms["gen"], terms["align"]]) / accum
        totals = detached if totals is None else totals + detached
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = whole(torch.nn.utils.clip_grad_norm_(trained.parameters(), max_grad_norm))
    finite = torch.isfinite(grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # the scaler skips non-finite steps itself
        scaler.update()
    else:
        # The fused AdamW skips the update (and its step count) where found_inf is 1: no host sync.
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm, finite


def micro_batches(loader, count):
    return [next(loader) for _ in range(count)]
