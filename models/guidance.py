"""Classifier-free guidance (SPEC §5).

`cfg_forward` runs the conditional and unconditional halves as one batch of 2N. `guided_model_fn`
builds the function every sampler calls; outside the guidance interval it runs only the conditional
model at batch N — the public samplers compute both halves there and discard one. The unconditional
half takes the null condition (conditioning.Condition.null_like): the null class of a class-conditional
model by default, the empty caption's context for a text model, which must be given.
"""
import torch

RELEASE_DIT_GUIDED_CHANNELS = 3  # the DiT release guides only the first 3 latent channels


def _null(model, y, null):
    if null is not None:
        return null
    if not hasattr(model, "num_classes"):
        raise ValueError("guidance of a model without classes needs its null condition (e.g. the empty caption)")
    return torch.full_like(y, model.num_classes)


def cfg_forward(model, x, t, y, scale, guide_channels=None, null=None):
    """Guided prediction (N, C_out, H, W): uncond + scale·(cond − uncond) on the first
    `guide_channels` output channels (default: all input channels, i.e. the whole prediction but not a
    learned variance range); the remaining channels come from the conditional half. null: the batch's
    null condition, shaped as y (default: the null class of a class-conditional model)."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, _null(model, y, null)]))
    cond, uncond = out.chunk(2)
    c = x.shape[1] if guide_channels is None else guide_channels
    guided = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)


def guided_model_fn(model, y, *, scale=1.0, interval=(0.0, 1.0), guide_channels=None, null=None):
    """model_fn(x, t_model, t_frac) for the samplers of diffusion/ and transport/.

    t_model is the (N,) time in the network's units; t_frac the step's noise level in [0, 1] as a
    Python float, so the interval test costs no device sync. Guidance applies where
    interval[0] <= t_frac <= interval[1] (inclusive, as REPA's sampler). null: as cfg_forward's."""
    low, high = interval
    dtype = next(model.parameters()).dtype
    if scale != 1.0:
        null = _null(model, y, null)

    def model_fn(x, t_model, t_frac):
        x = x.to(dtype)
        if scale == 1.0 or not low <= t_frac <= high:
            return model(x, t_model, y)
        return cfg_forward(model, x, t_model, y, scale, guide_channels, null)

    return model_fn
