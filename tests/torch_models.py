"""Small PyTorch models for the torch import tests: each builder returns
`(module, example_inputs)` with fixed seeds, the module in eval mode.

They cover the op families real models bring in: Conv/BatchNorm/ReLU with residual Adds
and a strided 1x1 downsample, a transformer encoder with a padding mask (MatMul, Softmax,
LayerNorm, GELU, Where), and recurrent layers (LSTM, GRU).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch import nn


def _warm_batchnorm(module: nn.Module, shape: Tuple[int, ...], steps: int = 4) -> None:
    """Give BatchNorm layers non-trivial running statistics (train-mode forward passes on
    random batches), then switch to eval mode."""
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(torch.randn(*shape) * 2.0 + 0.5)
    module.eval()


class _Block(nn.Module):
    """Residual block: conv-bn-relu-conv-bn + shortcut (1x1 strided conv-bn when the
    shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.down is None else self.down(x)
        return torch.relu(y + shortcut)


class ResNetTiny(nn.Module):
    """Stem conv-bn-relu, two residual blocks (the second strided), global average
    pool, flatten, linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = _Block(8, 8, 1)
        self.block2 = _Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet() -> Tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = ResNetTiny()
    _warm_batchnorm(model, (8, 3, 16, 16))
    return model, (torch.randn(2, 3, 16, 16),)


class Encoder(nn.Module):
    """TransformerEncoder (2 layers, d_model 32, 4 heads, GELU, batch_first) with a
    key padding mask, then a LayerNorm'd mean over the sequence and a classifier."""

    def __init__(self, d_model: int = 32, classes: int = 5):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True
        )
        # enable_nested_tensor=False: the fast path would change the exported graph
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x, pad_mask):
        y = self.encoder(x, src_key_padding_mask=pad_mask)
        return torch.softmax(self.head(self.norm(y).mean(dim=1)), dim=-1)


def transformer() -> Tuple[nn.Module, tuple]:
    torch.manual_seed(1)
    model = Encoder().eval()
    x = torch.randn(2, 6, 32)
    pad_mask = torch.zeros(2, 6, dtype=torch.bool)
    pad_mask[1, 4:] = True  # the second sequence is 4 long
    return model, (x, pad_mask)


class RecurrentClassifier(nn.Module):
    """LSTM or GRU over a float sequence; the last step goes through a Linear."""

    def __init__(self, cell: str = "lstm", features: int = 6, hidden: int = 16, classes: int = 4):
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(features, hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


def lstm() -> Tuple[nn.Module, tuple]:
    torch.manual_seed(2)
    return RecurrentClassifier("lstm").eval(), (torch.randn(3, 7, 6),)


def gru() -> Tuple[nn.Module, tuple]:
    torch.manual_seed(3)
    return RecurrentClassifier("gru").eval(), (torch.randn(3, 7, 6),)


class MobileNetTiny(nn.Module):
    """MobileNet-style: stem conv-bn-relu6, two depthwise-separable blocks (3x3
    depthwise conv-bn-relu6, 1x1 pointwise conv-bn-relu6, the second strided), an
    inverted residual (expand, depthwise, project, + input), pool, linear."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def cbr(cin, cout, k, stride=1, groups=1, act=True):
            layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
            return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

        self.features = nn.Sequential(
            cbr(3, 8, 3, 2),
            cbr(8, 8, 3, groups=8), cbr(8, 16, 1),
            cbr(16, 16, 3, 2, groups=16), cbr(16, 24, 1),
        )
        self.residual = nn.Sequential(cbr(24, 48, 1), cbr(48, 48, 3, groups=48), cbr(48, 24, 1, act=False))
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.features(x)
        x = x + self.residual(x)
        return self.fc(x.mean((2, 3)))


def mobilenet() -> Tuple[nn.Module, tuple]:
    torch.manual_seed(4)
    model = MobileNetTiny()
    _warm_batchnorm(model, (8, 3, 32, 32))
    return model, (torch.randn(2, 3, 32, 32),)


BUILDERS: Dict[str, Callable[[], Tuple[nn.Module, tuple]]] = {
    "resnet": resnet,
    "transformer": transformer,
    "lstm": lstm,
    "gru": gru,
    "mobilenet": mobilenet,
}


def exported(name: str):
    """BUILDERS[name] through qcompile.from_torch, inputs `x` (and the transformer's
    `mask`) and output `y` with a symbolic batch axis: (model, example inputs)."""
    import qcompile

    module, args = BUILDERS[name]()
    names = ["x", "mask"][:len(args)]
    model = qcompile.from_torch(module, args, input_names=names, output_names=["y"],
                                dynamic_axes={**{n: {0: "N"} for n in names}, "y": {0: "N"}})
    return model, args


def sample_feeds(args: tuple, sample_axis: bool = False, seed: int = 0) -> Callable[[int], Dict[str, np.ndarray]]:
    """A function n -> n random feeds shaped like the example inputs `args`, from one
    seeded generator: `x` normal, the transformer's key padding `mask` with every other
    sequence padded after position 4. `sample_axis`: each sample keeps a batch axis of 1
    (N x the input's shape, the .npz convention of samples run one by one)."""
    gen = torch.Generator().manual_seed(seed)
    lead = (1,) if sample_axis else ()

    def data(n: int) -> Dict[str, np.ndarray]:
        d = {"x": torch.randn(n, *lead, *args[0].shape[1:], generator=gen).numpy()}
        if len(args) > 1:
            mask = np.zeros((n, *lead, args[1].shape[1]), bool)
            mask[::2, ..., 4:] = True
            d["mask"] = mask
        return d

    return data
