"""The EMA of the backbone (SPEC §3 step 8): the weights that are sampled and evaluated, and SRA's teacher."""
import copy

import torch

from training.parallel import full_state_dict, load_full_state_dict, local

EMA_DECAY = 0.9999  # paper main text and release (the paper's appendix table says 0.999)


class EMA:
    """θ̄ ← m·θ̄ + (1 − m)·θ with fused `torch._foreach_*` ops in fp32.

    Every run keeps one: its model is what is sampled and evaluated, and SRA uses it as the teacher.
    It stays in eval mode with requires_grad off, so no graph is ever built through it."""

    def __init__(self, backbone, decay=EMA_DECAY):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(backbone).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, backbone, apply=None, decay=None):
        """Move the EMA toward `backbone`. `apply` is an optional 0-d tensor (1 = update, 0 = keep),
        so a skipped optimizer step also skips the EMA without a host sync; `decay` overrides m for this
        update (a scheduled teacher). m = 0 copies the weights exactly (lerp with weight 1 returns the end).
        Sharded (--parallel fsdp) models are sharded alike, so each process updates its own shards."""
        decay = self.decay if decay is None else decay
        params = [local(p) for p in self.model.parameters()]
        source = [local(p) for p in backbone.parameters()]
        if apply is None:
            torch._foreach_lerp_(params, source, 1.0 - decay)
        else:
            weight = apply.to(params[0].dtype) * (1.0 - decay)
            torch._foreach_lerp_(params, source, [weight] * len(source))

    def state_dict(self, keep=True):
        """The whole state dict (gathered when sharded: every process must call it; see full_state_dict)."""
        return full_state_dict(self.model, keep)

    def load_state_dict(self, state_dict):
        load_full_state_dict(self.model, state_dict)
