"""The text task of ``sam-fused compare`` (``--task text``): a byte-level causal transformer
language model trained with AdamW and the SAM family that language models use, on text every
Python installation carries: the standard library's own sources.

Data: every ``.py`` file directly in ``sysconfig.get_paths()["stdlib"]`` (no packages, so no
``test/``, ``idlelib/`` or ``site-packages/``), sorted by name; every ``VAL_EVERY``-th file of
that list (the 10th, 20th, ...) is validation, the rest training: a split by file, so no file is
in both. The bytes of each part, file after file, are one stream of tokens 0-255. Training
draws ``batch_size`` windows of ``context + 1`` bytes at seeded random offsets of the training
stream per step; the validation loss is the mean cross-entropy of the next byte, in bits per
byte, over ``VAL_WINDOWS`` windows evenly spaced over the validation stream (the same for every
seed and optimizer). The corpus is fixed by the Python version; the seed draws the initialization
and the batches.

Model (``ByteLM``): a byte embedding and a learned position embedding, ``layers`` pre-norm
blocks (LayerNorm, causal multi-head self-attention from one ``qkv`` Linear and an output
Linear, LayerNorm, a 4x GELU MLP of two Linears), a final LayerNorm and a head tied to the byte
embedding (the logits are ``h @ embed.weight.T``). Linear and Embedding weights are drawn from
N(0, 0.02), biases are zero. The defaults (context 64, d_model 64, 2 layers, 4 heads: 0.11M
parameters) train one AdamW run of 300 steps of 16 windows in 15 s on one core of a shared 2-core
AMD EPYC (25 s when the load average is 5-7); all seven optimizers, one seed: 3 minutes.

The learning rate is constant (no warmup, no decay): the model after ``k`` steps of a run of
``steps`` steps is then exactly the model a run of ``k`` steps ends with, so the equal-compute
figure of a method with two forward/backward passes per step can be taken in the same run, at
the step where its passes reach AdamW's total (``equal_compute_step``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VAL_EVERY = 10  # every 10th file of the sorted list is validation
VAL_WINDOWS = 256  # windows of the validation loss, evenly spaced over the validation stream


@dataclass(frozen=True)
class TextTask:
    """The defaults of ``--task text`` (the CLI's options override them)."""

    name: str = "text"
    describe: str = "byte-level transformer language model on the standard library's .py sources"
    base: str = "adamw"
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1  # on the weight matrices; none on biases and LayerNorms
    rho: float = 0.05  # SAM's (and psam, fsam, fsam-p, sam-phase): benchmarks/NOTES.md, "The text task"
    msam_rho: float = 0.1  # Momentum-SAM's
    context: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4


TEXT = TextTask()

# the optimizers of the text task: AdamW and the SAM family over it
OPTIMIZERS = ("adamw", "sam-adamw", "psam", "fsam", "fsam-p", "msam-adamw", "sam-phase")
# those whose radius is --rho (a sweep runs each once per value); msam-adamw's is --msam-rho
RHO_SWEPT = ("sam-adamw", "psam", "fsam", "fsam-p", "sam-phase")
PHASE = (0.75, 1.0)  # sam-phase: SAM on the last 25% of the steps


# ------------------------------------------------------------------------------------ data
def stdlib_files(root: Path | str | None = None) -> list[Path]:
    """Every ``.py`` file directly in the standard library's folder (``root``: another folder),
    sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    return sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)


def split_files(files: list[Path], every: int = VAL_EVERY) -> tuple[list[Path], list[Path]]:
    """(train, validation): file ``i`` of the list (from 0) is validation when ``i % every ==
    every - 1``."""
    val = [f for i, f in enumerate(files) if i % every == every - 1]
    train = [f for i, f in enumerate(files) if i % every != every - 1]
    return train, val


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8, the training files' bytes one after the other
    val: torch.Tensor  # uint8, the validation files'
    train_files: tuple[str, ...]  # names
    val_files: tuple[str, ...]
    root: str
    sha256: str  # of the train bytes, then the validation bytes

    def record(self) -> dict:
        """What the JSON says about the data."""
        return dict(root=self.root, python=sys.version, files=len(self.train_files) + len(self.val_files),
                    train_files=len(self.train_files), val_files=len(self.val_files),
                    train_bytes=int(self.train.numel()), val_bytes=int(self.val.numel()), val_every=VAL_EVERY,
                    val_windows=VAL_WINDOWS, sha256=self.sha256, val_file_names=list(self.val_files))


_CORPORA: dict[str, Corpus] = {}


def corpus(root: Path | str | None = None) -> Corpus:
    """The standard library's sources split by file (read once per process)."""
    key = str(Path(sysconfig.get_paths()["stdlib"] if root is None else root))
    if key not in _CORPORA:
        train, val = split_files(stdlib_files(key))
        if not train or not val:
            raise SystemExit(f"sam-fused compare --task text: {key} holds {len(train) + len(val)} .py files; "
                             f"it needs at least {VAL_EVERY}")
        a, b = b"".join(f.read_bytes() for f in train), b"".join(f.read_bytes() for f in val)
        as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)  # noqa: E731
        _CORPORA[key] = Corpus(as_tensor(a), as_tensor(b), tuple(f.name for f in train), tuple(f.name for f in val),
                               key, hashlib.sha256(a + b).hexdigest())
    return _CORPORA[key]


def batch(stream: torch.Tensor, batch_size: int, context: int,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at seeded random offsets: (inputs, next bytes), each [batch, context]."""
    starts = torch.randint(0, stream.numel() - context, (batch_size,), generator=gen)
    chunk = stream[starts[:, None] + torch.arange(context + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


def val_windows(stream: torch.Tensor, context: int, count: int = VAL_WINDOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` windows evenly spaced over ``stream`` (fewer when it is short): (inputs, next bytes)."""
    count = max(1, min(count, stream.numel() // (context + 1)))
    starts = torch.linspace(0, stream.numel() - context - 1, count).long()
    chunk = stream[starts[:, None] + torch.arange(context + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


# ------------------------------------------------------------------------------------ model
class Block(nn.Module):
    """Pre-norm: h + attn(LN(h)), then h + MLP(LN(h)); causal attention, GELU MLP of width 4d."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class ByteLM(nn.Module):
    """Byte and position embeddings, ``layers`` blocks, a final LayerNorm, the head tied to the
    byte embedding."""

    def __init__(self, context: int = 64, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not a multiple of heads {heads}")
        self.embed, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return F.linear(self.norm(h), self.embed.weight)


def byte_lm(seed: int, context: int = TEXT.context, d: int = TEXT.d_model, layers: int = TEXT.layers,
            heads: int = TEXT.heads) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(context, d, layers, heads)


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next byte, in nats."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def bits_per_byte(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 64) -> float:
    """The mean cross-entropy of the next byte over (x, y), in bits per byte."""
    model.eval()
    total = 0.0
    for i in range(0, len(x), chunk):
        total += float(F.cross_entropy(model(x[i:i + chunk]).reshape(-1, 256), y[i:i + chunk].reshape(-1),
                                       reduction="sum"))
    model.train()
    return total / y.numel() / math.log(2.0)


# ------------------------------------------------------------------------------------ 4-bit weights
def quantize_rows(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Symmetric round-to-nearest per row (per output channel of a Linear, per token of an
    Embedding): ``scale = max|row| / (2^(bits-1) - 1)``, ``q = clamp(round(w / scale), -7, 7)``
    for 4 bits (15 of the 16 codes: symmetric), returned dequantized, ``q * scale``. A row of
    zeros stays zero."""
    levels = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale).clamp(-levels, levels) * scale


def quantized(model: nn.Module, bits: int = 4) -> nn.Module:
    """A copy of ``model`` with every Linear and Embedding weight matrix rounded by
    :func:`quantize_rows` (the tied head with the embedding); biases and LayerNorms kept."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(quantize_rows(m.weight, bits))
    return out


# ------------------------------------------------------------------------------------ optimizers
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices, none on biases and LayerNorm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
            dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]


def make_optimizer(name: str, model: nn.Module, steps: int, lr: float, rho: float, msam_rho: float,
                   weight_decay: float = TEXT.weight_decay):
    """``name`` of :data:`OPTIMIZERS` over AdamW (betas 0.9, 0.95)."""
    from .. import MSAM, FunctionalSAM, FusedSAM
    from ..nn import phase_window

    groups, base = param_groups(model, weight_decay), dict(lr=lr, betas=(0.9, 0.95))
    adamw = torch.optim.AdamW
    if name == "adamw":
        return adamw(groups, **base)
    if name == "sam-adamw":
        return FusedSAM(groups, adamw, rho=rho, **base)
    if name == "psam":
        return FusedSAM(groups, adamw, rho=rho, precondition=True, **base)
    if name == "fsam":
        return FunctionalSAM(groups, adamw, rho=rho, **base)
    if name == "fsam-p":
        return FunctionalSAM(groups, adamw, rho=rho, precondition=True, **base)
    if name == "msam-adamw":
        return MSAM(groups, adamw, rho=msam_rho, **base)
    if name == "sam-phase":
        return FusedSAM(groups, adamw, rho=rho, phase=phase_window(*PHASE, steps), **base)
    raise ValueError(f"unknown text optimizer {name!r}")


def passes_per_step(opt, steps: int) -> list[int]:
    """Forward/backward passes of each of ``steps`` steps: 2 on a SAM step of FusedSAM and
    FunctionalSAM (the second forward and backward at w + e), 1 otherwise (AdamW, Momentum-SAM,
    the plain steps of a phase)."""
    from .. import FusedSAM

    if isinstance(opt, FusedSAM):
        return [2 if opt.is_sam_step(i) else 1 for i in range(steps)]
    return [1] * steps


def equal_compute_step(passes: list[int], budget: int | None = None) -> int:
    """The number of steps after which a run has made at most ``budget`` forward/backward passes
    (default: AdamW's over as many steps, ``len(passes)``): the last such step count."""
    budget = len(passes) if budget is None else budget
    done = 0
    for k, p in enumerate(passes):
        if done + p > budget:
            return k
        done += p
    return len(passes)


def train_step(name: str, opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of ``name``: AdamW and Momentum-SAM backpropagate once and step; FusedSAM's
    closure runs forward and backward; FunctionalSAM's the forward only (``(loss, logits)``)."""
    if name in ("fsam", "fsam-p"):
        def forward():
            logits = model(x)
            return loss_of(logits, y), logits

        opt.step(forward)
        return
    opt.zero_grad()
    if name in ("adamw", "msam-adamw"):
        loss_of(model(x), y).backward()
        opt.step()
        return

    def closure():
        loss = loss_of(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)


def train_run(name: str, data: Corpus, seed: int, steps: int, batch_size: int, lr: float, rho: float,
              msam_rho: float, context: int, d_model: int, layers: int, heads: int) -> dict:
    """One optimizer, one seed: train ``steps`` steps, evaluate at the equal-compute step and at
    the end, then the end's model with 4-bit weights. Training time excludes the evaluations."""
    import time
    import warnings

    from .. import MSAM
    from ..optim.base import LargePerturbationWarning

    model = byte_lm(seed, context, d_model, layers, heads)
    opt = make_optimizer(name, model, steps, lr, rho, msam_rho)
    passes = passes_per_step(opt, steps)
    half = equal_compute_step(passes)
    x_val, y_val = val_windows(data.val, context)
    gen = torch.Generator().manual_seed(seed)

    def evaluate() -> float:
        if isinstance(opt, MSAM):  # the weights are w - r m between steps: evaluate w
            with opt.unperturbed():
                return bits_per_byte(model, x_val, y_val)
        return bits_per_byte(model, x_val, y_val)

    seconds, at_half = 0.0, None
    with warnings.catch_warnings():  # compare says it once per run, after the table (perturbation_fraction)
        warnings.simplefilter("ignore", LargePerturbationWarning)
        for step in range(steps):
            if step == half:
                at_half = evaluate()
            x, y = batch(data.train, batch_size, context, gen)
            t0 = time.perf_counter()
            train_step(name, opt, model, x, y)
            seconds += time.perf_counter() - t0
    if isinstance(opt, MSAM):
        opt.restore()  # the end of training: w, not the perturbed point
    final = bits_per_byte(model, x_val, y_val)
    four = bits_per_byte(quantized(model), x_val, y_val)
    return dict(val_bpb=final, val_bpb_equal_compute=final if at_half is None else at_half, equal_compute_step=half,
                passes=sum(passes), passes_at_equal_compute=sum(passes[:half]), val_bpb_4bit=four,
                quant_increase=four - final, train_seconds=seconds, steps_per_second=steps / seconds,
                perturbation_fraction=getattr(opt, "perturbation_fraction", None))
