"""The projection head g_φ (SPEC §3 step 5)."""
import torch.nn as nn

from models.transformer import init_linears

HEAD_EXPANSION = 2  # hidden width 2D: the release's `ap_head` shape


class ProjectionHead(nn.Module):
    """Linear(D, 2D) → SiLU → Linear(2D, D) on the student's tokens (N, T, D).

    Parameter names match the SRA release's `ap_head.linear{1,2}.*`, so its heads load here.
    Trained with the student, saved beside the backbone, never used for sampling. init: as the backbone's
    linear layers (`PatchBackbone.linear_init`); the release's head is part of its SiT/DiT, so it starts
    from the model's Xavier-uniform weights and zero biases."""

    def __init__(self, dim, init="xavier"):
        super().__init__()
        self.linear1 = nn.Linear(dim, HEAD_EXPANSION * dim)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(HEAD_EXPANSION * dim, dim)
        init_linears(self, init)

    def forward(self, h):
        return self.linear2(self.act(self.linear1(h)))
