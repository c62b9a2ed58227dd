"""Built-in benchmark models (no downloads): a ResNet-style CNN and a transformer encoder/decoder.

Each comes with a batch maker of synthetic data and a loss, so a training step needs nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    """ResNet-18 layout (4 stages of 2 blocks) at a chosen width, for 32x32 images."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, w in enumerate(widths):
            for j in range(2):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Seq2Seq(nn.Module):
    """Token embedding, ``nn.Transformer`` encoder/decoder, tied-free output head."""

    def __init__(self, d_model: int, layers: int, vocab: int = 8192) -> None:
        super().__init__()
        heads = d_model // 64 if (d_model // 64) % 2 == 0 else d_model // 32  # even: nested-tensor fast path
        self.embed = nn.Embedding(vocab, d_model)
        self.core = nn.Transformer(d_model, heads, layers, layers, 4 * d_model, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, src, tgt):
        return self.head(self.core(self.embed(src), self.embed(tgt)))


def transformer_width(params: float, layers: int = 6, vocab: int = 8192) -> int:
    """d_model (a multiple of 64) giving about ``params`` parameters: 168 d^2 for 6+6 layers at
    ff = 4d (12 d^2 per encoder layer, 16 d^2 per decoder layer) plus 2 * vocab * d."""
    a, b = 28.0 * layers, 2.0 * vocab
    d = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    return max(64, int(round(d / 64)) * 64)


@dataclass
class Workload:
    name: str
    model: nn.Module
    make_batch: Callable[[int], tuple]
    forward: Callable[[nn.Module, tuple], torch.Tensor]  # the model's outputs on a batch
    criterion: Callable[[torch.Tensor, tuple], torch.Tensor]  # the loss of those outputs
    batch_sizes: dict[str, int]  # "compute-heavy" and "optimizer-heavy"

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        return self.criterion(self.forward(model, batch), batch)


def build(name: str, device: torch.device, transformer_params: float, dtype=torch.float32) -> Workload:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    if name == "resnet":
        model = ResNet(width=64 if gpu else 16).to(device=device, dtype=dtype)

        def make_batch(bs):
            x = torch.randn(bs, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
            return x, torch.randint(0, 10, (bs,), generator=gen).to(device)

        sizes = {"compute-heavy": 256 if gpu else 64, "optimizer-heavy": 8 if gpu else 2}
        return Workload(name, model, make_batch, lambda m, b: m(b[0]), lambda out, b: F.cross_entropy(out.float(), b[1]),
                        sizes)
    if name == "transformer":
        vocab, seq = 8192, 64 if gpu else 16
        model = Seq2Seq(transformer_width(transformer_params, vocab=vocab), 6, vocab).to(device=device, dtype=dtype)

        def make_batch(bs):
            src = torch.randint(0, vocab, (bs, seq), generator=gen).to(device)
            tgt = torch.randint(0, vocab, (bs, seq), generator=gen).to(device)
            return src, tgt

        sizes = {"compute-heavy": 64 if gpu else 16, "optimizer-heavy": 2 if gpu else 1}
        return Workload(name, model, make_batch, lambda m, b: m(b[0], b[1]),
                        lambda out, b: F.cross_entropy(out.float().flatten(0, 1), b[1].flatten()), sizes)
    if name == "many-small":
        # ~1000 small tensors: the case where launches, not bytes, decide.
        model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(500)]).to(device=device, dtype=dtype)

        def make_batch(bs):
            return torch.randn(bs, 32, generator=gen).to(device=device, dtype=dtype), None

        return Workload(name, model, make_batch, lambda m, b: m(b[0]), lambda out, b: out.float().square().mean(),
                        {"compute-heavy": 256, "optimizer-heavy": 4})
    raise ValueError(f"unknown model {name!r}")


MODELS = ("resnet", "transformer", "many-small")
