"""See the sharpness: Hessian spectrum, trace, Frobenius norm and loss landscapes of any model.

Every function takes ``(model, loss_fn, data)``: ``data`` is any iterable of ``(inputs, targets)``
batches (a DataLoader, a list), the loss is ``loss_fn(model(inputs), targets)`` averaged over the
batches given, the model is put in eval mode while it runs (``train=False``; pass ``train=True``
to keep its mode), and on return its parameters are bit-identical and its mode is as before.
Hessian-vector products use double backward; the Hessian itself is never formed.

Measures used by the SAM literature:

- ``hessian_eigenvalues``: the k largest eigenvalues and lambda_1 / lambda_k (Foret et al., 2021
  report lambda_1 and lambda_1 / lambda_5), by Lanczos (scipy's ARPACK ``eigsh``).
- ``hessian_trace``: Hutchinson's estimator E[v^T H v], Rademacher v, with its standard error.
- ``hessian_frobenius``: the squared Frobenius norm E[||H v||^2] = tr(H^2), with its standard error.
- ``hessian_spectrum``: a spectral density by stochastic Lanczos quadrature.
- ``loss_landscape``: 1-D and 2-D losses along random filter-normalized directions (Li et al.,
  2018), or along the line to another checkpoint; optionally saved as a PNG.

Example::

    from sam_fused.tools.sharpness import hessian_eigenvalues, hessian_trace, loss_landscape

    batches = [(x, y)]                                # or a DataLoader
    top = hessian_eigenvalues(model, F.cross_entropy, batches, k=5)
    print(top.eigenvalues[0], top.ratio)              # lambda_1, lambda_1 / lambda_5
    tr = hessian_trace(model, F.cross_entropy, batches, num_probes=100)
    print(tr.value, "+-", tr.stderr)
    land = loss_landscape(model, F.cross_entropy, batches, dims=2, save="landscape.png")

scipy is needed for the eigenvalues and matplotlib for the pictures (the ``[sharpness]`` extra:
``pip install "/path/to/sam_fused[sharpness]"`` from a clone, or ``pip install scipy matplotlib``).

The Lanczos and Hutchinson estimators are written here on top of scipy rather than taken from
curvlinops-for-pytorch: that library's requirements (backpack-for-pytorch, which requires
torchvision) force a newer torch than the one a user may have installed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------- plumbing
@contextlib.contextmanager
def _evaluating(model: nn.Module, train: bool):
    """Eval mode (unless ``train``) and an exact copy of every parameter, both put back on exit."""
    was_training = model.training
    saved = [p.detach().clone() for p in model.parameters()]
    if not train:
        model.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
        model.train(was_training)


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _batches(data: Iterable) -> list[tuple]:
    batches = list(data)
    if not batches:
        raise ValueError("data has no batches")
    return batches


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch, device):
    x, y = batch
    return x.to(device), y.to(device)


def average_loss(model: nn.Module, loss_fn: LossFn, data: Iterable) -> float:
    """``loss_fn(model(x), y)`` averaged over the batches, without gradients."""
    batches = _batches(data)
    device = _device(model)
    with torch.no_grad():
        return float(sum(float(loss_fn(model(x), y)) for x, y in (_to(b, device) for b in batches)) / len(batches))


class HessianOperator:
    """v -> H v for the loss averaged over ``batches``, on the flattened trainable parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: list[tuple]) -> None:
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.params = _params(model)
        self.size = sum(p.numel() for p in self.params)
        self.device = _device(model)
        self.dtype = self.params[0].dtype

    def matvec(self, v: Tensor) -> Tensor:
        """H v for a flat vector ``v`` (any float dtype, any device); returned like ``v``."""
        chunks = torch.split(v.to(device=self.device, dtype=self.dtype), [p.numel() for p in self.params])
        vs = [c.view_as(p) for c, p in zip(chunks, self.params)]
        total = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        for x, y in (_to(b, self.device) for b in self.batches):
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            hv = torch.autograd.grad(grads, self.params, grad_outputs=vs, allow_unused=True)
            total += torch.cat([
                (h if h is not None else torch.zeros_like(p)).reshape(-1).double() for h, p in zip(hv, self.params)
            ])
        return (total / len(self.batches)).to(device=v.device, dtype=v.dtype)

    def numpy_matvec(self, v: np.ndarray) -> np.ndarray:
        return self.matvec(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))).numpy()


def _rademacher(n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1


# ---------------------------------------------------------------------------- eigenvalues
@dataclass
class Eigenvalues:
    eigenvalues: list[float]  # the k largest (algebraic), descending
    ratio: float  # eigenvalues[0] / eigenvalues[-1]


def hessian_eigenvalues(
    model: nn.Module, loss_fn: LossFn, data: Iterable, k: int = 5, tol: float = 1e-6, seed: int = 0,
    train: bool = False,
) -> Eigenvalues:
    """The ``k`` largest Hessian eigenvalues (Lanczos, scipy ``eigsh``) and lambda_1 / lambda_k."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    with _evaluating(model, train):
        op = HessianOperator(model, loss_fn, _batches(data))
        if not 0 < k < op.size:
            raise ValueError(f"k must be between 1 and {op.size - 1} for this model, got {k}")
        linop = LinearOperator((op.size, op.size), matvec=op.numpy_matvec, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(op.size)
        vals = eigsh(linop, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    vals = sorted((float(x) for x in vals), reverse=True)
    return Eigenvalues(vals, vals[0] / vals[-1])


# ---------------------------------------------------------------------------- Hutchinson
@dataclass
class Estimate:
    value: float
    stderr: float  # standard error of the mean over probes
    samples: list[float] = field(repr=False)


def _estimate(samples: list[float]) -> Estimate:
    arr = np.asarray(samples, dtype=np.float64)
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return Estimate(float(arr.mean()), stderr, samples)


def _hutchinson(model, loss_fn, data, num_probes: int, seed: int, train: bool,
                statistic: Callable[[Tensor, HessianOperator], float]) -> Estimate:
    """Mean and standard error of ``statistic(v, H)`` over Rademacher probes v."""
    gen = torch.Generator().manual_seed(seed)
    with _evaluating(model, train):
        op = HessianOperator(model, loss_fn, _batches(data))
        samples = [statistic(_rademacher(op.size, gen), op) for _ in range(num_probes)]
    return _estimate(samples)


def hessian_trace(
    model: nn.Module, loss_fn: LossFn, data: Iterable, num_probes: int = 100, seed: int = 0, train: bool = False,
) -> Estimate:
    """Hutchinson's trace estimate: the mean of v^T H v over ``num_probes`` Rademacher vectors."""
    return _hutchinson(model, loss_fn, data, num_probes, seed, train, lambda v, op: float(v @ op.matvec(v)))


def hessian_frobenius(
    model: nn.Module, loss_fn: LossFn, data: Iterable, num_probes: int = 100, seed: int = 0, train: bool = False,
) -> Estimate:
    """The squared Frobenius norm ||H||_F^2 = tr(H^2), estimated as the mean of ||H v||^2."""

    def squared_norm(v: Tensor, op: HessianOperator) -> float:
        hv = op.matvec(v)
        return float(hv @ hv)

    return _hutchinson(model, loss_fn, data, num_probes, seed, train, squared_norm)


# ---------------------------------------------------------------------------- spectral density
@dataclass
class Spectrum:
    grid: np.ndarray  # eigenvalue axis
    density: np.ndarray  # estimated density on the grid (integrates to about 1)
    nodes: list[np.ndarray]  # Ritz values of each probe
    weights: list[np.ndarray]  # their quadrature weights (sum to 1 per probe)


def _lanczos(matvec: Callable[[Tensor], Tensor], v: Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos with full reorthogonalization from ``v``: the tridiagonal (alpha, beta)."""
    basis = [v / v.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(basis[-1])
        alpha = float(w @ basis[-1])
        alphas.append(alpha)
        w = w - alpha * basis[-1] - (betas[-1] * basis[-2] if betas else 0)
        for q in basis:  # full reorthogonalization keeps the Ritz values honest
            w = w - (w @ q) * q
        beta = float(w.norm())
        if j == steps - 1 or beta < 1e-10:
            break
        betas.append(beta)
        basis.append(w / beta)
    return np.array(alphas), np.array(betas)


@dataclass
class Extremes:
    lambda_max: float  # the largest Ritz value: the largest eigenvalue, from below
    lambda_min: float  # the smallest Ritz value: the smallest (most negative) eigenvalue, from above
    ritz: list[float] = field(repr=False)

    @property
    def ratio(self) -> float:
        """|lambda_max / lambda_min| (inf when lambda_min is 0)."""
        return abs(self.lambda_max / self.lambda_min) if self.lambda_min != 0 else float("inf")


def hessian_extremes(model: nn.Module, loss_fn: LossFn, data: Iterable, steps: int = 40, seed: int = 0,
                     train: bool = False) -> Extremes:
    """Both ends of the Hessian's spectrum by one Lanczos run with full reorthogonalization from a
    random start (``steps`` Hessian-vector products): the extreme Ritz values converge first, from
    inside the spectrum, so they bound the true extremes and approach them as ``steps`` grows."""
    gen = torch.Generator().manual_seed(seed)
    with _evaluating(model, train):
        op = HessianOperator(model, loss_fn, _batches(data))
        alpha, beta = _lanczos(op.matvec, torch.randn(op.size, generator=gen, dtype=torch.float64),
                               min(steps, op.size))
    tri = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    theta = np.linalg.eigvalsh(tri)
    return Extremes(float(theta[-1]), float(theta[0]), theta.tolist())


def hessian_spectrum(
    model: nn.Module, loss_fn: LossFn, data: Iterable, num_probes: int = 4, lanczos_steps: int = 60,
    num_points: int = 512, sigma: float | None = None, seed: int = 0, train: bool = False,
) -> Spectrum:
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al., 2019): Lanczos runs from
    ``num_probes`` random starts, each Ritz value a Gaussian of width ``sigma`` weighted by the
    square of the first component of its eigenvector; ``sigma`` defaults to 1% of the spectrum's
    range."""
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    with _evaluating(model, train):
        op = HessianOperator(model, loss_fn, _batches(data))
        steps = min(lanczos_steps, op.size)
        for _ in range(num_probes):
            alpha, beta = _lanczos(op.matvec, _rademacher(op.size, gen), steps)
            tri = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
            theta, vecs = np.linalg.eigh(tri)
            nodes.append(theta)
            weights.append(vecs[0, :] ** 2)
    lo = min(float(n.min()) for n in nodes)
    hi = max(float(n.max()) for n in nodes)
    span = max(hi - lo, 1e-12)
    sigma = sigma or 0.01 * span
    grid = np.linspace(lo - 3 * sigma - 0.05 * span, hi + 3 * sigma + 0.05 * span, num_points)
    density = np.zeros_like(grid)
    for theta, w in zip(nodes, weights):
        density += (w[None, :] * np.exp(-((grid[:, None] - theta[None, :]) ** 2) / (2 * sigma**2))).sum(1)
    density /= num_probes * sigma * math.sqrt(2 * math.pi)
    return Spectrum(grid, density, nodes, weights)


# ---------------------------------------------------------------------------- loss landscapes
def filter_normalized_direction(model: nn.Module, seed: int = 0, ignore_biasbn: bool = True) -> list[Tensor]:
    """A Gaussian direction, rescaled filter by filter to the norms of the weights (Li et al., 2018).

    For a parameter with two or more dimensions, each filter (slice along dimension 0) of the
    direction gets the norm of the same filter of the weight. One-dimensional parameters (biases,
    normalization scales) get a zero direction, or, with ``ignore_biasbn=False``, a copy of the weight.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in _params(model):
        w = p.detach()
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
        if w.dim() <= 1:
            d = torch.zeros_like(w) if ignore_biasbn else w.clone()
        else:
            d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
            scale = w_rows.norm(dim=1, keepdim=True) / (d_rows.norm(dim=1, keepdim=True) + 1e-10)
            d = (d_rows * scale).reshape(w.shape)
        out.append(d)
    return out


@dataclass
class Landscape:
    alphas: np.ndarray
    betas: np.ndarray | None  # None for a 1-D landscape
    losses: np.ndarray  # shape (len(alphas),) or (len(alphas), len(betas))
    center_loss: float


def loss_landscape(
    model: nn.Module, loss_fn: LossFn, data: Iterable, dims: int = 1, steps: int = 21,
    span: float = 1.0, seed: int = 0, endpoint: nn.Module | dict | None = None,
    directions: Sequence[list[Tensor]] | None = None, save: str | Path | None = None,
    kind: str = "contour", title: str | None = None, train: bool = False,
) -> Landscape:
    """Loss along ``dims`` (1 or 2) directions: L(w + a d1 [+ b d2]) for a, b in [-span, span].

    Directions default to filter-normalized Gaussian ones (seeds ``seed``, ``seed + 1``); with
    ``endpoint`` (a model or a state dict), the single direction is ``w_end - w`` and a runs from
    ``-span/2`` to ``1 + span/2``, so a = 0 is this model and a = 1 the endpoint. ``save`` writes a
    PNG: a line for 1-D, a ``"contour"`` or ``"surface"`` plot for 2-D.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    if kind not in ("contour", "surface"):
        raise ValueError(f"kind must be 'contour' or 'surface', got {kind!r}")
    batches = _batches(data)
    params = _params(model)
    if endpoint is not None:
        if dims != 1:
            raise ValueError("a landscape towards an endpoint is one-dimensional")
        end = endpoint.state_dict() if isinstance(endpoint, nn.Module) else endpoint
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        directions = [[(end[n].to(p) - p.detach()) for n, p in zip(names, params)]]
        alphas = np.linspace(-span / 2, 1 + span / 2, steps)
    else:
        if directions is None:
            directions = [filter_normalized_direction(model, seed + i) for i in range(dims)]
        if len(directions) != dims:
            raise ValueError(f"{dims} directions needed, got {len(directions)}")
        alphas = np.linspace(-span, span, steps)
    betas = alphas.copy() if dims == 2 else None
    with _evaluating(model, train):
        base = [p.detach().clone() for p in params]
        center = average_loss(model, loss_fn, batches)

        def loss_at(a: float, b: float = 0.0) -> float:
            with torch.no_grad():
                for i, p in enumerate(params):
                    shift = a * directions[0][i] + (b * directions[1][i] if dims == 2 else 0)
                    p.copy_(base[i] + shift)
            return average_loss(model, loss_fn, batches)

        if dims == 1:
            losses = np.array([loss_at(a) for a in alphas])
        else:
            losses = np.array([[loss_at(a, b) for b in betas] for a in alphas])
    land = Landscape(alphas, betas, losses, center)
    if save is not None:
        plot_landscapes({title or "model": land}, save, kind=kind, endpoint=endpoint is not None)
    return land


def plot_landscapes(landscapes: dict[str, Landscape], path: str | Path, kind: str = "contour",
                    endpoint: bool = False) -> Path:
    """One PNG: 1-D landscapes as curves on shared axes, 2-D ones as side-by-side panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = list(landscapes.items())
    xlabel = "interpolation a (0: this model, 1: endpoint)" if endpoint else "step a along filter-normalized direction 1"
    if items[0][1].betas is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, land in items:
            ax.plot(land.alphas, land.losses, marker="o", markersize=3, label=name)
        if all(float(np.min(land.losses)) > 0 for _, land in items):
            ax.set_yscale("log")  # the width of the basin near its floor is what tells minima apart
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (log scale)" if ax.get_yscale() == "log" else "loss")
        ax.set_title("Loss landscape (1-D)")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        from matplotlib.colors import LogNorm, Normalize

        n = len(items)
        vmax = max(float(np.max(land.losses)) for _, land in items)
        vmin = min(float(np.min(land.losses)) for _, land in items)
        if vmin > 0:  # log-spaced levels: the basin's extent at low loss is what differs
            levels, norm = np.geomspace(vmin, vmax, 25), LogNorm(vmin, vmax)
        else:
            levels, norm = np.linspace(vmin, vmax, 25), Normalize(vmin, vmax)
        if kind == "surface":
            fig = plt.figure(figsize=(5.2 * n, 4.6))
        else:
            fig, axes = plt.subplots(1, n, figsize=(5.0 * n + 1.0, 4.4), squeeze=False, constrained_layout=True)
        for i, (name, land) in enumerate(items):
            b, a = np.meshgrid(land.betas, land.alphas)
            if kind == "surface":
                ax = fig.add_subplot(1, n, i + 1, projection="3d")
                ax.plot_surface(a, b, land.losses, cmap="viridis", vmin=vmin, vmax=vmax)
                ax.set_zlabel("loss")
            else:
                ax = axes[0][i]
                cs = ax.contourf(a, b, land.losses, levels=levels, cmap="viridis", norm=norm)
                ax.contour(a, b, land.losses, levels=levels[::3], colors="white", linewidths=0.5)
                ax.plot([0], [0], marker="x", color="red")
            ax.set_xlabel("direction 1 (a)")
            ax.set_ylabel("direction 2 (b)")
            ax.set_title(f"{name}: loss at centre {land.center_loss:.3f}")
        if kind != "surface":
            fig.colorbar(cs, ax=axes[0].tolist(), label="loss (log-spaced levels)" if vmin > 0 else "loss",
                         format="%.3g")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
