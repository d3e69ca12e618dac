"""The linear probe of the paper (App. C, following REPA and l-DAE): pooled features -> BatchNorm
without affine parameters -> one linear layer, trained for 80 epochs at batch 4096 with a cosine
learning rate from 1e-3. The optimizer is AdamW, the default of the ConvNeXt code base the paper
names for its probes; the paper states no weight decay or warm-up, so the defaults have none."""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from errors import UserError

PROBE_EPOCHS = 80  # paper App. C
PROBE_BATCH_SIZE = 4096  # paper App. C
PROBE_LR = 1e-3  # paper App. C: initial learning rate of the cosine schedule
PROBE_WEIGHT_DECAY = 0.0  # not stated by the paper; MAE's linear probe uses none
NORM_EPS = 1e-6  # MAE's linear-probe BatchNorm, the head REPA and l-DAE use
HEAD_INIT_STD = 0.01  # MAE's linear-probe head initialization (truncated normal)
EVAL_BATCH_SIZE = 65_536  # rows per forward when scoring; only memory depends on it


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    epochs: int = PROBE_EPOCHS
    batch_size: int = PROBE_BATCH_SIZE
    lr: float = PROBE_LR
    weight_decay: float = PROBE_WEIGHT_DECAY
    seed: int = 0  # head initialization and batch order

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise UserError(f"--epochs, --probe-batch-size and --lr must be positive and --weight-decay >= 0, got "
                            f"{self.epochs}, {self.batch_size}, {self.lr:g} and {self.weight_decay:g}")


class LinearProbe(nn.Module):
    def __init__(self, width: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.BatchNorm1d(width, affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=HEAD_INIT_STD, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.norm(features.float()))  # (N, D) -> (N, classes)


def cosine_factor(step: int, total_steps: int) -> float:
    """Learning-rate factor at `step`: 1 at the start, 0 after the last step."""
    return 0.5 * (1 + math.cos(math.pi * step / total_steps))


def train_linear_probe(features: Tensor, labels: Tensor, num_classes: int, config: ProbeConfig | None = None,
                       progress: bool = True) -> LinearProbe:
    """A probe trained on features (N, D) with labels (N,), both on the training device.

    Each epoch is one seeded permutation cut into ceil(N / batch_size) batches of nearly equal size,
    so no batch is left with a single row (BatchNorm needs two)."""
    if len(features) < 2 or len(features) != len(labels):
        raise ValueError(f"a probe needs at least 2 features with one label each, got {len(features)} "
                         f"features and {len(labels)} labels")
    config = config or ProbeConfig()
    generator = torch.Generator().manual_seed(config.seed)
    probe = LinearProbe(features.shape[1], num_classes, generator).to(features.device).train()
    batches_per_epoch = math.ceil(len(features) / config.batch_size)
    total_steps = config.epochs * batches_per_epoch
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total_steps))
    for _ in tqdm(range(config.epochs), desc="probe", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for batch in torch.tensor_split(order, batches_per_epoch):
            loss = F.cross_entropy(probe(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval()


@torch.no_grad()
def top1_accuracy(probe: LinearProbe, features: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose highest logit is the label (the probe in eval mode: running BN stats)."""
    probe.eval()
    correct = 0
    for start in range(0, len(features), EVAL_BATCH_SIZE):
        predicted = probe(features[start:start + EVAL_BATCH_SIZE]).argmax(dim=1)
        correct += int((predicted == labels[start:start + EVAL_BATCH_SIZE]).sum())
    return correct / len(features)
