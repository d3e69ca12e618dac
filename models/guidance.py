"""Classifier-free guidance (SPEC §5).

`cfg_forward` runs the conditional and unconditional halves as one batch of 2N. `guided_model_fn`
builds the function every sampler calls; outside the guidance interval it runs only the conditional
model at batch N — the public samplers compute both halves there and discard one.
"""
import torch

RELEASE_DIT_GUIDED_CHANNELS = 3  # the DiT release guides only the first 3 latent channels


def cfg_forward(model, x, t, y, scale, guide_channels=None):
    """Guided prediction (N, C_out, H, W): uncond + scale·(cond − uncond) on the first
    `guide_channels` output channels (default: all input channels, i.e. the whole prediction but not a
    learned variance range); the remaining channels come from the conditional half."""
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = out.chunk(2)
    c = x.shape[1] if guide_channels is None else guide_channels
    guided = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)


def guided_model_fn(model, y, *, scale=1.0, interval=(0.0, 1.0), guide_channels=None):
    """model_fn(x, t_model, t_frac) for the samplers of diffusion/ and transport/.

    t_model is the (N,) time in the network's units; t_frac the step's noise level in [0, 1] as a
    Python float, so the interval test costs no device sync. Guidance applies where
    interval[0] <= t_frac <= interval[1] (inclusive, as REPA's sampler)."""
    low, high = interval
    dtype = next(model.parameters()).dtype

    def model_fn(x, t_model, t_frac):
        x = x.to(dtype)
        if scale == 1.0 or not low <= t_frac <= high:
            return model(x, t_model, y)
        return cfg_forward(model, x, t_model, y, scale, guide_channels)

    return model_fn
