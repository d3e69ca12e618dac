"""Running a model trained in the SiT release's time convention (t = 1 is data) in this one."""

from torch import Tensor, nn


class ReversedTime(nn.Module):
    """Wraps a velocity model of the original SiT release so that it samples correctly here.

    SiT's release trains on x_t = t·x0 + (1 - t)·ε with t = 1 the data, and predicts v = x0 - ε.
    In this project's convention (t = 0 data, SPEC §2) the same model is v(x, t) = -model(x, 1 - t, y).
    Load the release's state dict into the model first, then wrap it (the wrapper adds the prefix
    `model.` to state-dict keys). Exposes the wrapped model's num_classes, in_channels, learn_sigma.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def learn_sigma(self) -> bool:
        return self.model.learn_sigma

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """-model(x, 1 - t, y): the velocity toward noise at this project's time t."""
        return -self.model(x, 1 - t, y)
