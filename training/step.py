"""One optimizer step of the training loop."""
import contextlib

import torch

from preprocessing.dataset import sample_model_input


def train_step(batches, meta, loss_fn, trained, teacher_model, optimizer, scaler, config, weight, accelerator):
    """One optimizer step over `grad_accum_steps` micro-batches. Returns device tensors only (no host
    sync): the loss terms, the grad norm and whether the step was applied (all gradients finite)."""
    accum = config["grad_accum_steps"]
    totals = None
    for index, (x, y) in enumerate(batches):
        x0 = sample_model_input(x.to(accelerator.device, non_blocking=True), meta)
        y = y.to(accelerator.device, non_blocking=True)
        # Gradients are all-reduced only on the last micro-batch.
        sync = contextlib.nullcontext() if index == accum - 1 else accelerator.no_sync(trained)
        with sync, accelerator.autocast():
            terms = loss_fn(trained, teacher_model, x0, y, weight)
            accelerator.backward(terms["loss"] / accum)
        detached = torch.stack([terms["loss"].detach(), terms["gen"], terms["align"]]) / accum
        totals = detached if totals is None else totals + detached
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), config["max_grad_norm"])
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
