"""Launch configurations of the Triton kernels, as data: ``launch_configs.json`` beside this file.

For each pass (``PASSES``) and bucket size class, a configuration says

    chunk       elements per program-chunk: a divisor of the table's chunk (``constants.CHUNK``),
                a multiple of ``block``; a table chunk is split into ``constants.CHUNK // chunk``
                program-chunks (the empty ones past a tensor's end return at once)
    block       elements per iteration of the element loop (a power of two; elements per thread
                per array = block / (32 * num_warps))
    num_warps   warps per program
    grid        "chunks": one program per program-chunk; "persistent": ``programs`` programs (a
                fixed count) or ``per_sm`` x the GPU's multiprocessors, program k walking chunks
                k, k + G, ... (the reductions, whose partial sums are one per program, must be
                persistent)
    tail        optional: elements per step of the masked rest of a chunk (a power of two, at most
                block; default block: one masked block, as the kernels were written); each element of
                a masked access has its own address registers, so a narrow tail (32 x num_warps: one
                element per thread) keeps the tail from setting the kernel's register count
    num_stages  optional: the element loop as ``tl.range(..., num_stages=...)`` (software-pipelined
                loads where the compiler does it); absent or 0: a plain loop
    maxnreg     optional: a register cap per thread handed to ptxas

The table is keyed by ``torch.cuda.get_device_name()``; a GPU not in it, and the CPU (the
interpreter), take the ``default`` entry; an entry may leave passes or size classes out, which
then come from ``default``. ``SAM_FUSED_LAUNCH_CONFIGS=path`` replaces the committed file (a
sweep's winning table, say), and :func:`use` replaces it inside a ``with`` block. A bad file is a
``LaunchConfigError`` naming the entry. The correctness of every kernel does not depend on the
choice; speed does, and the norm's and dot products' bits depend on the program count (the order
of the sums is fixed by it), so they are reproducible for one configuration and GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import constants

PATH = Path(__file__).with_name("launch_configs.json")
ENV = "SAM_FUSED_LAUNCH_CONFIGS"
PASSES = ("norm", "perturb", "update", "dots", "msam_update", "msam_perturb", "usam_perturb", "usam_accumulate")
# passes whose programs each write one partial sum: bounded by a persistent grid
REDUCTIONS = ("norm", "dots", "msam_update")
MAX_PARTIALS = 8192  # programs of a reduction: the one-program final sum reads them all
KEYS = {"chunk", "block", "num_warps", "grid", "programs", "per_sm", "tail", "num_stages", "maxnreg"}


class LaunchConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    chunk: int
    block: int
    num_warps: int
    grid: str = "chunks"
    programs: int | None = None
    per_sm: int | None = None
    num_stages: int = 0
    maxnreg: int | None = None
    tail: int | None = None  # None: block

    @property
    def split(self) -> int:
        """Program-chunks per table chunk."""
        return constants.CHUNK // self.chunk

    @property
    def persistent(self) -> bool:
        return self.grid == "persistent"

    def grid_size(self, n_chunks: int, sm_count: int) -> int:
        """Programs of a launch over a table of ``n_chunks`` table chunks."""
        n = n_chunks * self.split
        if not self.persistent:
            return n
        cap = self.programs if self.programs is not None else self.per_sm * sm_count
        return min(n, cap)

    def kwargs(self) -> dict:
        """The launch's compile-time values and options."""
        out = dict(CHUNK=self.chunk, BLOCK=self.block, TAIL=self.tail or self.block, STAGES=self.num_stages,
                   num_warps=self.num_warps)
        if self.maxnreg:
            out["maxnreg"] = self.maxnreg
        return out

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and not (k == "num_stages" and v == 0)}

    def label(self) -> str:
        grid = "chunks" if not self.persistent else (
            f"persist{self.programs}" if self.programs is not None else f"persist{self.per_sm}xSM")
        extra = (f" t{self.tail}" if self.tail and self.tail != self.block else "") + (f" st{self.num_stages}" if self.num_stages else "") + (f" r{self.maxnreg}" if self.maxnreg else "")
        return f"c{self.chunk} b{self.block} w{self.num_warps} {grid}{extra}"


def _pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def parse_config(raw, where: str, pass_name: str) -> Config:
    """One configuration from its JSON object; ``where`` names it in errors."""
    if not isinstance(raw, dict):
        raise LaunchConfigError(f"{where}: a configuration must be an object, got {raw!r}")
    unknown = set(raw) - KEYS
    if unknown:
        raise LaunchConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(KEYS)})")
    missing = {"chunk", "block", "num_warps"} - set(raw)
    if missing:
        raise LaunchConfigError(f"{where}: missing {sorted(missing)}")
    for key in ("chunk", "block", "num_warps"):
        if not _pow2(raw[key]):
            raise LaunchConfigError(f"{where}: {key} must be a power of two, got {raw[key]!r}")
    chunk, block, warps = raw["chunk"], raw["block"], raw["num_warps"]
    if warps > 32:
        raise LaunchConfigError(f"{where}: num_warps {warps} is over 32 (1024 threads)")
    if block < 32 * warps:
        raise LaunchConfigError(f"{where}: block {block} is under one element per thread (32 x {warps} warps)")
    if chunk % block or chunk > constants.CHUNK:
        raise LaunchConfigError(f"{where}: chunk {chunk} must be a multiple of block {block} and divide "
                                f"the table's chunk {constants.CHUNK}")
    grid = raw.get("grid", "chunks")
    programs, per_sm = raw.get("programs"), raw.get("per_sm")
    if grid not in ("chunks", "persistent"):
        raise LaunchConfigError(f"{where}: grid must be 'chunks' or 'persistent', got {grid!r}")
    if grid == "chunks" and (programs is not None or per_sm is not None):
        raise LaunchConfigError(f"{where}: 'programs' and 'per_sm' belong to a persistent grid")
    if grid == "persistent":
        if (programs is None) == (per_sm is None):
            raise LaunchConfigError(f"{where}: a persistent grid takes exactly one of 'programs' and 'per_sm'")
        value = programs if programs is not None else per_sm
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LaunchConfigError(f"{where}: {'programs' if programs is not None else 'per_sm'} must be a "
                                    f"positive integer, got {value!r}")
        if (programs or 0) > MAX_PARTIALS or (per_sm or 0) > 64:
            raise LaunchConfigError(f"{where}: too many programs (programs <= {MAX_PARTIALS}, per_sm <= 64)")
    if pass_name in REDUCTIONS and grid != "persistent":
        raise LaunchConfigError(f"{where}: {pass_name} writes a partial sum per program: its grid must be persistent")
    stages = raw.get("num_stages", 0)
    if not isinstance(stages, int) or isinstance(stages, bool) or not 0 <= stages <= 8:
        raise LaunchConfigError(f"{where}: num_stages must be an integer in 0..8, got {stages!r}")
    maxnreg = raw.get("maxnreg")
    if maxnreg is not None and (not isinstance(maxnreg, int) or isinstance(maxnreg, bool) or not 24 <= maxnreg <= 255
                                or maxnreg % 8):
        raise LaunchConfigError(f"{where}: maxnreg must be a multiple of 8 in 24..255, got {maxnreg!r}")
    tail = raw.get("tail")
    if tail is not None and (not _pow2(tail) or tail > block or tail < 32 * warps):
        raise LaunchConfigError(f"{where}: tail must be a power of two from 32 x num_warps ({32 * warps}) to block "
                                f"({block}), got {tail!r}")
    return Config(chunk, block, warps, grid, programs, per_sm, stages, maxnreg, tail)


class Table:
    """A validated configuration table: ``lookup(gpu, pass, numel)``."""

    def __init__(self, data, source: str = "<table>") -> None:
        self.source = source
        if not isinstance(data, dict) or set(data) - {"version", "size_classes", "gpus", "notes"}:
            raise LaunchConfigError(f"{source}: the top level must be an object with 'version', 'size_classes' "
                                    "and 'gpus' (and optional 'notes')")
        if data.get("version") != 1:
            raise LaunchConfigError(f"{source}: version must be 1, got {data.get('version')!r}")
        classes = data.get("size_classes")
        if not isinstance(classes, dict) or not classes:
            raise LaunchConfigError(f"{source}: size_classes must be an object {{name: largest numel or null}}")
        bounds = []
        for name, bound in classes.items():
            if name == "*" or not (bound is None or (isinstance(bound, int) and not isinstance(bound, bool) and bound > 0)):
                raise LaunchConfigError(f"{source}: size class {name!r}: the bound must be a positive integer or null")
            bounds.append((float("inf") if bound is None else bound, name))
        if sorted(bounds) != bounds or bounds[-1][0] != float("inf"):
            raise LaunchConfigError(f"{source}: size classes must be in increasing order and end with null (no bound)")
        self.classes = bounds
        gpus = data.get("gpus")
        if not isinstance(gpus, dict) or "default" not in gpus:
            raise LaunchConfigError(f"{source}: gpus must be an object with a 'default' entry")
        self.entries: dict[str, dict[str, dict[str, Config]]] = {}
        for gpu, entry in gpus.items():
            where = f"{source}: gpus[{gpu!r}]"
            if not isinstance(entry, dict) or set(entry) - {"passes", "notes"} or not isinstance(entry.get("passes"), dict):
                raise LaunchConfigError(f"{where}: an entry must be an object with 'passes' (and optional 'notes')")
            parsed: dict[str, dict[str, Config]] = {}
            for pass_name, per_class in entry["passes"].items():
                if pass_name not in PASSES:
                    raise LaunchConfigError(f"{where}: unknown pass {pass_name!r} (passes: {', '.join(PASSES)})")
                if not isinstance(per_class, dict):
                    raise LaunchConfigError(f"{where}.{pass_name}: must map size classes (or '*') to configurations")
                parsed[pass_name] = {}
                for cls, raw in per_class.items():
                    if cls != "*" and cls not in classes:
                        raise LaunchConfigError(f"{where}.{pass_name}: unknown size class {cls!r} "
                                                f"(classes: {', '.join(classes)}, or '*')")
                    parsed[pass_name][cls] = parse_config(raw, f"{where}.{pass_name}[{cls!r}]", pass_name)
            self.entries[gpu] = parsed
        default = self.entries["default"]
        for pass_name in PASSES:
            for _, cls in self.classes:
                if cls not in default.get(pass_name, {}) and "*" not in default.get(pass_name, {}):
                    raise LaunchConfigError(f"{source}: gpus['default'] has no configuration for pass {pass_name!r}, "
                                            f"size class {cls!r}")

    def size_class(self, numel: int) -> str:
        for bound, name in self.classes:
            if numel <= bound:
                return name
        return self.classes[-1][1]

    def lookup(self, gpu: str | None, pass_name: str, numel: int) -> Config:
        cls = self.size_class(numel)
        for key in (gpu, "default"):
            per_class = self.entries.get(key, {}).get(pass_name) if key is not None else None
            if per_class:
                cfg = per_class.get(cls, per_class.get("*"))
                if cfg is not None:
                    return cfg
        raise LaunchConfigError(f"{self.source}: no configuration for {pass_name!r} ({cls})")  # validated: unreachable

    def to_json(self) -> dict:
        return {"version": 1, "size_classes": {n: (None if b == float("inf") else b) for b, n in self.classes},
                "gpus": {gpu: {"passes": {p: {c: cfg.as_json() for c, cfg in per.items()} for p, per in e.items()}}
                         for gpu, e in self.entries.items()}}


def load(path: str | os.PathLike) -> Table:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LaunchConfigError(f"{path}: cannot read the launch configurations: {e}") from e
    return Table(data, str(path))


_state = {"table": None, "generation": 0}
_names: dict = {}
_sms: dict = {}


def table() -> Table:
    if _state["table"] is None:
        _state["table"] = load(os.environ.get(ENV) or PATH)
    return _state["table"]


def generation() -> int:
    """Bumped whenever the table in force changes (cached launch choices are then stale)."""
    return _state["generation"]


@contextlib.contextmanager
def use(new: Table | dict | str | os.PathLike):
    """The kernels launch with ``new`` (a Table, its JSON object, or a path) inside the block."""
    if isinstance(new, dict):
        new = Table(new)
    elif not isinstance(new, Table):
        new = load(new)
    old = _state["table"]
    _state["table"] = new
    _state["generation"] += 1
    try:
        yield new
    finally:
        _state["table"] = old
        _state["generation"] += 1


def gpu_name(device) -> str | None:
    """``torch.cuda.get_device_name`` of a CUDA device (None on the CPU), asked once per device."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else -1
    if index not in _names:
        import torch

        _names[index] = torch.cuda.get_device_name(device)
    return _names[index]


def sm_count(device) -> int:
    """Multiprocessors of a CUDA device; 1 on the CPU (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else -1
    if index not in _sms:
        import torch

        _sms[index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[index]


def for_table(ptable, pass_name: str) -> tuple[Config, int]:
    """(configuration, grid size) of ``pass_name`` over a PointerTable, cached on the table until
    its chunks or the configuration table change."""
    cache = ptable.launch_cache
    key = (pass_name, generation(), ptable.n_chunks)
    hit = cache.get(pass_name)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    cfg = table().lookup(gpu_name(ptable.device), pass_name, ptable.numel)
    grid = cfg.grid_size(ptable.n_chunks, sm_count(ptable.device))
    cache[pass_name] = (key, cfg, grid)
    return cfg, grid
