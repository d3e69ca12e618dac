"""The projection head g_φ (SPEC §3 step 5)."""
import torch.nn as nn

HEAD_EXPANSION = 2  # hidden width 2D: the release's `ap_head` shape


class ProjectionHead(nn.Module):
    """Linear(D, 2D) → SiLU → Linear(2D, D) on the student's tokens (N, T, D).

    Parameter names match the SRA release's `ap_head.linear{1,2}.*`, so its heads load here.
    Trained with the student, saved beside the backbone, never used for sampling."""

    def __init__(self, dim):
        super().__init__()
        self.linear1 = nn.Linear(dim, HEAD_EXPANSION * dim)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(HEAD_EXPANSION * dim, dim)

    def forward(self, h):
        return self.linear2(self.act(self.linear1(h)))
