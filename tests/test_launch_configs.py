"""Launch configurations as data (sam_fused/kernels/launch_configs.json): the loader's checks, the
default entry (the launch parameters the kernels were written with), and correctness under every
configuration of the table and the sweep's candidates: the results must not depend on the choice.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import HAS_TRITON
from sam_fused import GSAM, MSAM, FrobSAM, FusedSAM, constants
from sam_fused.kernels import launch

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMMITTED = json.loads(launch.PATH.read_text())


def test_committed_table_loads_and_its_default_is_the_written_launch():
    table = launch.load(launch.PATH)
    for p in launch.PASSES:
        for n in (1, 10**6, 10**8, 10**10):
            cfg = table.lookup(None, p, n)
            assert (cfg.chunk, cfg.block, cfg.num_warps) == (constants.CHUNK, 4096, 8)
            assert cfg.tail is None and cfg.num_stages == 0 and cfg.maxnreg is None
            assert cfg.persistent == (p in launch.REDUCTIONS)
            if cfg.persistent:
                assert cfg.programs == 512
    # an unknown GPU takes the default entry
    assert table.lookup("Some Future GPU", "perturb", 10**9) == table.lookup(None, "perturb", 10**9)


def _bad(mutate):
    data = copy.deepcopy(COMMITTED)
    mutate(data)
    with pytest.raises(launch.LaunchConfigError) as e:
        launch.Table(data, "t.json")
    return str(e.value)


def test_a_bad_table_is_a_clear_error_naming_the_entry():
    d = lambda data: data["gpus"]["default"]["passes"]  # noqa: E731
    msg = _bad(lambda data: d(data)["perturb"]["*"].update(block=3000))
    assert "gpus['default'].perturb['*']" in msg and "power of two" in msg
    msg = _bad(lambda data: d(data)["norm"]["*"].update(grid="chunks", programs=None) or d(data)["norm"]["*"].pop("programs"))
    assert "norm" in msg and "persistent" in msg
    msg = _bad(lambda data: data["gpus"].update({"NVIDIA X": {"passes": {"update": {"huge": d(data)["update"]["*"]}}}}))
    assert "gpus['NVIDIA X'].update" in msg and "'huge'" in msg
    msg = _bad(lambda data: d(data).pop("dots"))
    assert "'dots'" in msg
    msg = _bad(lambda data: d(data)["perturb"]["*"].update(chunk=1 << 20))
    assert "divide" in msg
    msg = _bad(lambda data: d(data)["update"]["*"].update(wraps=4))
    assert "unknown keys" in msg and "wraps" in msg
    msg = _bad(lambda data: d(data)["perturb"]["*"].update(tail=64))
    assert "tail" in msg


def test_a_gpu_entry_overrides_by_size_class_and_falls_back(tmp_path):
    data = copy.deepcopy(COMMITTED)
    data["gpus"]["NVIDIA Test"] = {"passes": {"perturb": {"large": {"chunk": 16384, "block": 1024, "num_warps": 4}}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    table = launch.load(path)
    assert table.lookup("NVIDIA Test", "perturb", 10**9).block == 1024
    assert table.lookup("NVIDIA Test", "perturb", 1000).block == 4096  # small: the default entry
    assert table.lookup("NVIDIA Test", "update", 10**9).block == 4096
    path.write_text("{")
    with pytest.raises(launch.LaunchConfigError, match="t.json"):
        launch.load(path)


def _uniform(cfg: dict) -> dict:
    """A table whose every pass takes ``cfg`` (the reductions on a persistent grid)."""
    passes = {}
    for p in launch.PASSES:
        c = dict(cfg)
        if p in launch.REDUCTIONS and c.get("grid", "chunks") != "persistent":
            c.update(grid="persistent", programs=7)
        passes[p] = {"*": c}
    return {"version": 1, "size_classes": COMMITTED["size_classes"], "gpus": {"default": {"passes": passes}}}


def _configs():
    from sam_fused.tools.bench.sweep import candidate_dicts

    out = {}
    key = lambda c: launch.parse_config(c, "key", "perturb" if c.get("grid") != "persistent" else "norm")  # noqa: E731
    for gpu, entry in COMMITTED["gpus"].items():  # every configuration of the committed table
        for p, per in entry["passes"].items():
            for cls, cfg in per.items():
                out.setdefault(key(cfg), cfg)
    for ds in candidate_dicts().values():
        for cfg in ds:
            out.setdefault(key(cfg), cfg)
    # and a few shapes no table holds: small chunks (many empty programs), odd program counts
    for cfg in (dict(chunk=1024, block=512, num_warps=4, tail=128), dict(chunk=8192, block=1024, num_warps=8,
                grid="persistent", programs=3), dict(chunk=65536, block=256, num_warps=1, tail=32)):
        out.setdefault(key(cfg), cfg)
    return list(out.values())


CONFIGS = _configs()
IDS = [launch.parse_config(c, "id", "perturb").label().replace(" ", "_") for c in CONFIGS]
# `make test`: the default, fewer elements per thread with a narrow tail, and a split chunk on a
# persistent grid; the rest (pipelining, tiny chunks, odd program counts) in `make test-full`
# (and on a GPU)
QUICK = [dict(cfg=c) for c in CONFIGS if {k: v for k, v in c.items() if c.get("grid") == "persistent" or k != "grid"} in (
    dict(chunk=65536, block=4096, num_warps=8), dict(chunk=65536, block=1024, num_warps=4, tail=128),
    dict(chunk=16384, block=2048, num_warps=8, tail=256, grid="persistent", per_sm=4))]
SIZES = [1, 97, 5000, 70_003]  # one element, a tail only, a full block and a tail, two table chunks


def _run(table_json, dtype=torch.float32):
    """Parameters and state after SAM + SGD-momentum, SAM + AdamW, GSAM, Momentum-SAM and
    Frob-SAM steps, all on the triton backend under ``table_json``."""
    out = []
    with launch.use(table_json):
        for cls, base, kw in ((FusedSAM, torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-2)),
                              (FusedSAM, torch.optim.AdamW, dict(weight_decay=1e-2)),
                              (GSAM, torch.optim.SGD, dict(momentum=0.9)), (MSAM, torch.optim.SGD, dict(momentum=0.9)),
                              (FrobSAM, torch.optim.SGD, dict(n_samples=2, seed=1))):
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE, dtype)) for n in SIZES]
            coefs = [torch.rand(n, generator=gen).to(DEVICE, dtype) + 0.5 for n in SIZES]
            opt = cls(params, base, lr=0.05, backend="triton", **kw)

            def closure():
                opt.zero_grad()
                loss = sum(((p.float() * c.float()) ** 2).sum() for p, c in zip(params, coefs))
                loss.backward()
                return loss

            for _ in range(2):
                if cls is FusedSAM or cls is GSAM:
                    closure()
                    opt.first_step()
                    closure()
                    opt.second_step()
                else:
                    opt.step(closure)
            out.append([p.detach().float().cpu().clone() for p in params])
            out.append([v.float().cpu().clone() for st in opt.base_optimizer.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor) and v.numel() > 1])
    return out


_DEFAULT: dict = {}


@pytest.mark.quick_subset(None, QUICK)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_every_configuration_computes_the_same_steps(cfg):
    """Against the default configuration: elementwise passes give the same bits for the same
    inputs; the sums (norm, dots, Momentum-SAM's) change their order with the program count, so
    the comparison allows rounding."""
    if "ref" not in _DEFAULT:
        _DEFAULT["ref"] = _run(COMMITTED)
    got = _run(_uniform(cfg))
    for a, b in zip(got, _DEFAULT["ref"]):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_the_kernels_launch_with_the_table_in_force(monkeypatch):
    """The launch reads chunk, block, warps and grid from the table: a persistent grid of 3
    programs launches 3, a split chunk launches more programs than table chunks."""
    from sam_fused.kernels import perturb as K
    from sam_fused.kernels.table import PointerTable

    seen = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((grid, kw))

    monkeypatch.setattr(K, "_perturb_kernel", Spy())
    t = PointerTable().update(DEVICE, [(torch.zeros(200_000, device=DEVICE),) * 3])
    norm = torch.ones((), device=DEVICE)
    with launch.use(_uniform(dict(chunk=16384, block=1024, num_warps=4, grid="persistent", programs=3))):
        K.perturb(t, norm, torch.float32, 0.1, False, 0.0)
    with launch.use(_uniform(dict(chunk=16384, block=1024, num_warps=2, tail=64))):
        K.perturb(t, norm, torch.float32, 0.1, False, 0.0)
    (g1, kw1), (g2, kw2) = seen
    assert g1 == (3,) and kw1["PERSISTENT"] and kw1["num_warps"] == 4 and kw1["BLOCK"] == 1024
    assert g2 == (t.n_chunks * 4,) and not kw2["PERSISTENT"] and kw2["TAIL"] == 64 and kw2["CHUNK"] == 16384
