"""Host cost of FusedSAM (the copy of sam_fused on sys.path, e.g. an older checkout via PYTHONPATH)
and of MSAM's step vs SGD(fused=True), the loop of sam_fused/tools/bench/host.py without its dependencies, so that
two commits can be compared:  PYTHONPATH=/path/to/old/checkout python benchmarks/host_compare.py 100,1000,10000
(set TORCH_EXTENSIONS_DIR apart for the old checkout, whose native sources differ)."""
import statistics, sys, time
import torch
from sam_fused import MSAM, FusedSAM


def main() -> None:
    counts = [int(c) for c in sys.argv[1].split(",")]
    reps = 20
    for n in counts:
        gen = torch.Generator().manual_seed(n)
        data = [torch.randn(16, generator=gen) for _ in range(n)]
        sets = [[torch.randn(16, generator=gen) for _ in range(n)] for _ in range(4)]
        for regime in ("in place", "new"):
            sp = [torch.nn.Parameter(d.clone()) for d in data]; gp = [torch.nn.Parameter(d.clone()) for d in data]
            sam = FusedSAM(sp, torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, backend="cpu")
            sgd = torch.optim.SGD(gp, lr=1e-3, momentum=0.9, fused=True)
            def setg(ps, k):
                for p, g in zip(ps, sets[k]):
                    if regime == "new" or p.grad is None: p.grad = g.clone()
                    else: p.grad.copy_(g)
            ts, tg = [], []
            for r in range(3 + reps):
                setg(sp, 0); t0 = time.perf_counter(); sam.first_step(); a = time.perf_counter() - t0
                setg(sp, 1); t0 = time.perf_counter(); sam.second_step(); b = time.perf_counter() - t0
                setg(gp, 2); t0 = time.perf_counter(); sgd.step(); c = time.perf_counter() - t0
                if r >= 3: ts.append((a + b) * 1e6 / n); tg.append(c * 1e6 / n)
            mp = [torch.nn.Parameter(d.clone()) for d in data]
            msam = MSAM(mp, torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, backend="cpu")
            tm = []
            for r in range(3 + reps):
                setg(mp, 3); t0 = time.perf_counter(); msam.step(); a = time.perf_counter() - t0
                if r >= 3: tm.append(a * 1e6 / n)
            ms, mg, mm = statistics.median(ts), statistics.median(tg), statistics.median(tm)
            print(f"{n:6d} {regime:9s} sam {ms:6.2f} us  msam {mm:6.2f} us  sgd {mg:5.2f} us  "
                  f"ratio {ms / mg:4.2f} / {mm / mg:4.2f}")


if __name__ == "__main__":
    main()
