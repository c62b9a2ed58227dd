"""The tasks of ``sam-fused compare``: a data set made in the package (nothing is downloaded), a
model and the base optimizer, one per architecture of the study it follows.

===========  ==============================================  =========================  ======
task         data (seeded; train / test)                     model                      base
===========  ==============================================  =========================  ======
digits       scikit-learn's 8x8 digits, 20% of the training  MLP, 2 hidden layers of    SGD
             labels flipped (1078 / 719)                     128 (26K parameters)
images       10 classes of 3x16x16 images: two smooth        Wide ResNet WRN-16-1       SGD
             prototypes per class, shifted, flipped, scaled  (0.18M parameters)
             and under noise of 2.5x their scale (600 / 1000)
timeseries   5 classes of 128-sample heartbeat-like series   transformer encoder (patch SGD
             (P, QRS, T waves; classes differ in QRS width,  8, d 32, 2 layers, 4 heads;
             prematurity, T inversion, amplitude), time      18K parameters)
             jitter, baseline wander and noise; class mix
             55/20/12/8/5% (600 / 1500)
graphs       molecule-like graphs of 10-24 atoms of 5 types  GCN (3 graph convolutions  Adam
             (a random tree and a few ring bonds); label 1   of width 128, mean and max
             when an N atom has two O neighbours (a nitro-   pooling; 34K parameters)
             like group, planted in half the graphs), 10% of
             the training labels flipped (600 / 1200)
===========  ==============================================  =========================  ======

Sizes: one optimizer and one seed of a task trains in 9-17 s on 2 CPU cores (SGD, measured;
SAM doubles it), and the Hessian figures are taken on a fixed subset of the training set
(``hessian_samples``: 128 of each), so a 5-seed run with a four-value rho
sweep takes 15-25 minutes. With these sizes and noise levels the base optimizer fits the training
set (train accuracy 1.0 images, 0.995 series, 0.93 graphs on noisy labels, seed 0) while the test
accuracy stays between chance and 1 (0.57, 0.83, 0.89).

A graph is one row of a dense tensor ``[max_nodes, features + max_nodes + 1]``: the one-hot atom
types, the symmetrically normalized adjacency with self-loops, and the node mask; a batch of
graphs is then an ordinary tensor, so training, the Hessian and the landscapes treat every task
alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Split = tuple  # (x_train, y_train (noisy), y_train_clean, x_test, y_test)


@dataclass(frozen=True)
class Task:
    name: str
    describe: str
    base: str  # "sgd" or "adam"
    lr: float
    epochs: int
    batch_size: int
    rho: float  # SAM's default here (and the family's that takes --rho): see TASKS below
    train_size: int
    test_size: int
    hessian_samples: int  # 0: the whole training set
    data: Callable[[int, int, int], Split]  # (seed, train size, test size)
    model: Callable[[int], nn.Module]  # (seed)
    asam_rho: float = 0.5  # ASAM's default (eta 0.01)
    msam_rho: float = 0.3  # Momentum-SAM's default


# ------------------------------------------------------------------------------------ helpers
def _flip(y: np.ndarray, fraction: float, classes: int, rng: np.random.Generator) -> np.ndarray:
    """``fraction`` of the labels moved to another class at random."""
    out = y.copy()
    flip = rng.random(len(y)) < fraction
    out[flip] = (y[flip] + rng.integers(1, classes, flip.sum())) % classes
    return out


def _tensors(x_tr, y_tr, y_clean, x_te, y_te) -> Split:
    fx = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    fy = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return fx(x_tr), fy(y_tr), fy(y_clean), fx(x_te), fy(y_te)


# ------------------------------------------------------------------------------------ digits
def digits_data(seed: int, train_size: int = 0, test_size: int = 0, noise: float = 0.2) -> Split:
    """Standardized digits (train/test 60/40), ``noise`` of the training labels flipped."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("sam-fused compare needs scikit-learn: pip install scikit-learn (or the clone's "
                         "[sharpness] extra: pip install '/path/to/sam_fused[sharpness]')") from exc
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(len(x) * 0.4)
    test, train = order[:n_test], order[n_test:]
    if train_size:
        train = train[:train_size]
    if test_size:
        test = test[:test_size]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    y_clean = y[train].copy()
    return _tensors(x[train], _flip(y_clean, noise, 10, rng), y_clean, x[test], y[test])


def mlp(seed: int, width: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


# ------------------------------------------------------------------------------------ images
def images_data(seed: int, train_size: int = 600, test_size: int = 1000, classes: int = 10, size: int = 16,
                noise: float = 2.5) -> Split:
    """Two prototypes per class (smooth fields: 4x4 Gaussian noise upsampled), each sample one of
    them scaled by 0.6-1.4, shifted by up to 3 pixels, flipped left-right at random and under
    Gaussian noise of standard deviation ``noise`` (the prototypes have ~1). The prototypes are
    fixed (one task); the seed draws the samples."""
    gen = torch.Generator().manual_seed(1234)
    protos = F.interpolate(torch.randn(classes * 2, 3, 4, 4, generator=gen), size=(size, size), mode="bicubic",
                           align_corners=False)
    protos = protos / protos.std(dim=(1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed)

    def draw(n: int):
        y = torch.randint(0, classes, (n,), generator=g)
        k = torch.randint(0, 2, (n,), generator=g)
        x = protos[2 * y + k] * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g))
        shifts = torch.randint(-3, 4, (n, 2), generator=g)
        x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
        flip = torch.rand(n, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        return x + noise * torch.randn(x.shape, generator=g), y

    x_tr, y_tr = draw(train_size)
    x_te, y_te = draw(test_size)
    return x_tr, y_tr, y_tr.clone(), x_te, y_te


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.short is None else self.short(o))


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko and Komodakis, 2016): (depth - 4) / 6 pre-activation blocks per
    group, widths 16k, 32k, 64k."""

    def __init__(self, depth: int = 16, k: int = 2, classes: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
        cin = widths[0]
        for g, w in enumerate(widths[1:]):
            for b in range(n):
                layers.append(_WideBlock(cin, w, 2 if (g > 0 and b == 0) else 1))
                cin = w
        self.body = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.body(x)))
        return self.head(x.mean(dim=(2, 3)))


def wrn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return WideResNet(16, 1, 10)


# ------------------------------------------------------------------------------------ time series
# class mix and morphology: (probability, QRS width, QRS amplitude, onset shift, T sign, P wave)
BEATS = [
    (0.55, 0.030, 1.0, 0.00, +1.0, 1.0),   # normal
    (0.20, 0.030, 1.0, -0.12, +1.0, 0.0),  # premature, no P wave
    (0.12, 0.070, 1.4, 0.00, -1.0, 0.0),   # wide QRS, inverted T
    (0.08, 0.045, 0.8, 0.00, +1.0, 1.0),   # fusion: between normal and wide
    (0.05, 0.030, 0.5, 0.05, -0.5, 1.0),   # low amplitude, late, flat inverted T
]


def timeseries_data(seed: int, train_size: int = 600, test_size: int = 1500, length: int = 128,
                    noise: float = 0.35) -> Split:
    """Heartbeat-like series: a P wave, a QRS complex and a T wave as Gaussian bumps whose widths,
    amplitudes, timing and T sign depend on the class (``BEATS``), with per-beat amplitude and
    timing jitter, a slow baseline wander and white noise of standard deviation ``noise``."""
    rng = np.random.default_rng(seed)
    probs = np.array([b[0] for b in BEATS])
    t = np.linspace(0.0, 1.0, length)

    def draw(n: int):
        y = rng.choice(len(BEATS), size=n, p=probs / probs.sum())
        x = np.empty((n, length), dtype=np.float64)
        for i, c in enumerate(y):
            _, width, amp, shift, t_sign, p_wave = BEATS[c]
            jitter = rng.normal(0.0, 0.02)
            center = 0.45 + shift + jitter
            scale = rng.uniform(0.8, 1.2)
            w = width * rng.uniform(0.85, 1.15)
            beat = amp * np.exp(-0.5 * ((t - center) / w) ** 2)
            beat -= 0.25 * amp * np.exp(-0.5 * ((t - center - 2.2 * w) / (0.8 * w)) ** 2)  # S dip
            beat += t_sign * 0.3 * np.exp(-0.5 * ((t - center - 0.25) / 0.05) ** 2)  # T wave
            beat += p_wave * 0.15 * np.exp(-0.5 * ((t - center + 0.15) / 0.03) ** 2)  # P wave
            wander = 0.2 * np.sin(2 * math.pi * (rng.uniform(0.3, 1.0) * t + rng.uniform(0, 1)))
            x[i] = scale * beat + wander + rng.normal(0.0, noise, length)
        return x[:, None, :], y

    x_tr, y_tr = draw(train_size)
    x_te, y_te = draw(test_size)
    return _tensors(x_tr, y_tr, y_tr, x_te, y_te)


class SeriesTransformer(nn.Module):
    """Patches of ``patch`` samples embedded to ``d``, a learned position, a pre-norm transformer
    encoder, mean pooling and a linear head."""

    def __init__(self, length: int = 128, patch: int = 8, d: int = 32, layers: int = 2, heads: int = 4,
                 classes: int = 5) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, d)
        self.pos = nn.Parameter(torch.zeros(1, length // patch, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        tokens = x.reshape(x.shape[0], -1, self.patch)
        # the math kernel: the Hessian's double backward has no derivative through the fused CPU
        # attention kernels (and at 16 tokens the math one costs nothing)
        with sdpa_kernel([SDPBackend.MATH]):
            h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(self.norm(h.mean(dim=1)))


def series_transformer(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return SeriesTransformer()


# ------------------------------------------------------------------------------------ graphs
ATOMS = ("C", "N", "O", "H", "S")
ATOM_P = (0.5, 0.12, 0.18, 0.15, 0.05)
MAX_NODES = 24


def _molecule(rng: np.random.Generator, plant: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(atom types, adjacency, label): a random tree of 10-24 atoms with 1-2 ring bonds; with
    ``plant`` an N atom gets two O neighbours. The label is whether any N has >= 2 O neighbours."""
    n = int(rng.integers(10, MAX_NODES + 1))
    types = rng.choice(len(ATOMS), size=n, p=ATOM_P)
    adj = np.zeros((n, n), dtype=np.float64)
    for i in range(1, n):
        j = int(rng.integers(0, i))
        adj[i, j] = adj[j, i] = 1.0
    for _ in range(int(rng.integers(1, 3))):
        i, j = rng.choice(n, size=2, replace=False)
        adj[i, j] = adj[j, i] = 1.0
    n_idx, o_idx = ATOMS.index("N"), ATOMS.index("O")
    if plant:
        hub = int(rng.integers(0, n))
        types[hub] = n_idx
        nbrs = np.flatnonzero(adj[hub])
        extra = [k for k in range(n) if k != hub and k not in nbrs]
        while len(nbrs) < 2 and extra:  # bond two atoms to it if it has fewer neighbours
            k = extra.pop(int(rng.integers(0, len(extra))))
            adj[hub, k] = adj[k, hub] = 1.0
            nbrs = np.flatnonzero(adj[hub])
        for k in rng.choice(nbrs, size=2, replace=False):
            types[k] = o_idx
    else:  # no N with two O neighbours: change such Ns to C
        for i in np.flatnonzero(types == n_idx):
            if (types[np.flatnonzero(adj[i])] == o_idx).sum() >= 2:
                types[i] = ATOMS.index("C")
    label = int(any((types[np.flatnonzero(adj[i])] == o_idx).sum() >= 2 for i in np.flatnonzero(types == n_idx)))
    return types, adj, label


def encode_graph(types: np.ndarray, adj: np.ndarray) -> np.ndarray:
    """One dense row: one-hot types, D^-1/2 (A + I) D^-1/2 and the node mask, padded to MAX_NODES."""
    n = len(types)
    out = np.zeros((MAX_NODES, len(ATOMS) + MAX_NODES + 1), dtype=np.float64)
    out[np.arange(n), types] = 1.0
    a = adj + np.eye(n)
    d = 1.0 / np.sqrt(a.sum(1))
    out[:n, len(ATOMS):len(ATOMS) + n] = d[:, None] * a * d[None, :]
    out[:n, -1] = 1.0
    return out


def graphs_data(seed: int, train_size: int = 600, test_size: int = 1200, noise: float = 0.1) -> Split:
    """Molecule-like graphs, the motif planted in half of them; ``noise`` of the training labels
    flipped."""
    rng = np.random.default_rng(seed)

    def draw(n: int):
        rows, labels = [], []
        for i in range(n):
            types, adj, label = _molecule(rng, plant=bool(i % 2))
            rows.append(encode_graph(types, adj))
            labels.append(label)
        order = rng.permutation(n)
        return np.stack(rows)[order], np.array(labels)[order]

    x_tr, y_clean = draw(train_size)
    x_te, y_te = draw(test_size)
    return _tensors(x_tr, _flip(y_clean, noise, 2, rng), y_clean, x_te, y_te)


class GCN(nn.Module):
    """Graph convolutions h <- relu(A_hat h W) (Kipf and Welling, 2017) on the dense rows of
    ``encode_graph``, then the mean and the max over the nodes and a linear head."""

    def __init__(self, features: int = len(ATOMS), width: int = 128, layers: int = 3, classes: int = 2) -> None:
        super().__init__()
        dims = [features] + [width] * layers
        self.convs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        f = len(ATOMS)
        h, adj, mask = x[..., :f], x[..., f:f + MAX_NODES], x[..., -1:]
        for conv in self.convs:
            h = F.relu(adj @ conv(h)) * mask
        mean = h.sum(1) / mask.sum(1).clamp(min=1.0)
        top = (h + (mask - 1.0) * 1e4).amax(1)
        return self.head(torch.cat([mean, top], dim=1))


def gcn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return GCN()


# The default radii (SAM and the family that takes --rho; ASAM with eta 0.01; Momentum-SAM), from
# the sweeps of benchmarks/NOTES.md ("Default radii"): the largest tried value per task that trains
# and stays below sam_fused.optim.base.LARGE_PERTURBATION of the weights' norm at initialization
# (digits 9.4, images 25.6, timeseries 18.8, graphs 11.8). The study's best radii (images 2,
# timeseries 1) and Momentum-SAM's published 3 stop these small models from training.
TASKS = {
    "digits": Task("digits", "scikit-learn digits, 20% of training labels flipped, MLP", "sgd", 0.05, 100, 64, 0.05,
                   0, 0, 0, digits_data, mlp, asam_rho=0.5, msam_rho=0.5),
    "images": Task("images", "synthetic 10-class 3x16x16 images, Wide ResNet WRN-16-1", "sgd", 0.05, 20, 64, 0.05,
                   600, 1000, 128, images_data, wrn, asam_rho=0.5, msam_rho=1.0),
    "timeseries": Task("timeseries", "synthetic 5-class heartbeats (imbalanced), transformer encoder", "sgd", 0.05,
                       80, 64, 0.05, 600, 1500, 128, timeseries_data, series_transformer, asam_rho=0.5, msam_rho=0.3),
    "graphs": Task("graphs", "synthetic molecule graphs (nitro-like motif), 10% of training labels flipped, GCN",
                   "adam", 3e-3, 200, 64, 0.05, 600, 1200, 128, graphs_data, gcn, asam_rho=0.5, msam_rho=0.3),
}
