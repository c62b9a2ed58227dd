"""The preconditioned perturbation against SAM over AdamW, the CPU native backend: one FusedSAM step
(first_step + second_step, no forward/backward) on 2.37M fp32 parameters in 108 tensors, three
rounds of 30 steps each side by side: python benchmarks/precondition_cost.py"""
import statistics, time, torch, sam_fused
torch.manual_seed(0)
shapes = [(256, 256)] * 24 + [(256,)] * 60 + [(64, 512)] * 24
for backend in ["cpu"]:
    res = {}
    for rnd in range(3):
        for name, kw in [("sam", {}), ("psam", {"precondition": True})]:
            ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
            opt = sam_fused.FusedSAM(ps, torch.optim.AdamW, rho=0.05, lr=1e-3, backend=backend, **kw)
            g = [torch.randn(s) for s in shapes]
            ts = []
            for r in range(35):
                for p, x in zip(ps, g): p.grad = x.clone()  # a new tensor: an in-place copy reads as an accumulation
                t0 = time.perf_counter(); opt.first_step(); a = time.perf_counter() - t0
                t0 = time.perf_counter(); opt.second_step(); b = time.perf_counter() - t0
                if r >= 5: ts.append((a + b) * 1e3)
            res.setdefault(name, []).append(statistics.median(ts))
    n = sum(p.numel() for p in ps)
    print(backend, f"{n} params in {len(shapes)} tensors", {k: [round(v, 3) for v in vs] for k, vs in res.items()},
          "ratio", [round(b / a, 3) for a, b in zip(res["sam"], res["psam"])])
