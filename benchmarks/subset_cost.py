"""SAM-ON (``perturb=False`` for every parameter outside the normalization layers,
``norm_layer_param_groups``) against SAM and the base optimizer alone, over AdamW on the CPU native
backend: one step without forward/backward (FusedSAM: first_step + second_step; AdamW: its fused-free
``step()`` under the same gradients) of a 6-layer transformer encoder (d 256, feed-forward 1024),
three rounds of 30 timed steps, each round the three side by side: python benchmarks/subset_cost.py"""
import statistics
import time

import torch

import sam_fused

torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
model = torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
params = list(model.parameters())
grads = [torch.randn_like(p) for p in params]


def build(name):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    groups = sam_fused.norm_layer_param_groups(model) if name == "sam-on" else params
    return sam_fused.FusedSAM(groups, torch.optim.AdamW, rho=0.05, lr=1e-3, backend="cpu")


res = {}
for rnd in range(3):
    for name in ("sam", "sam-on", "adamw"):
        state = [p.detach().clone() for p in params]
        opt = build(name)
        ts = []
        for r in range(35):
            for p, g in zip(params, grads):
                p.grad = g.clone()  # a new tensor: an in-place copy reads as an accumulation
            t0 = time.perf_counter()
            if name == "adamw":
                opt.step()
            else:
                opt.first_step()
                opt.second_step()
            if r >= 5:
                ts.append((time.perf_counter() - t0) * 1e3)
        res.setdefault(name, []).append(statistics.median(ts))
        with torch.no_grad():
            for p, s in zip(params, state):
                p.copy_(s)
n = sum(p.numel() for p in params)
perturbed = sum(p.numel() for g in sam_fused.norm_layer_param_groups(model) if g.get("perturb", True)
                for p in g["params"])
print(f"{n} params in {len(params)} tensors, {perturbed} ({perturbed / n:.2%}) in the norm layers")
print("step ms per round:", {k: [round(v, 3) for v in vs] for k, vs in res.items()})
print("sam-on / sam:", [round(b / a, 3) for a, b in zip(res["sam"], res["sam-on"])],
      " sam-on / adamw:", [round(b / a, 3) for a, b in zip(res["adamw"], res["sam-on"])])
