"""Train a timm model with SAM, ASAM or Momentum-SAM and mixed precision, on synthetic images (no
download): each class is a fixed random pattern under noise, so the loss has something to learn.

    python examples/timm_sam.py --model resnet10t --opt sam_sgd --steps 30
    python examples/timm_sam.py --opt msam_adamw --lr 1e-3 --rho 3

The optimizer comes from timm's factory (its weight-decay groups; ``--layer-decay`` for ViTs).
SAM needs two backward passes per step: ``first_step(grad_scaler=scaler)`` after the first,
``scaler.step(opt)`` after the second. Momentum-SAM needs one: timm's ``NativeScaler`` runs it as it
runs any optimizer. fp16 with a GradScaler on CUDA, bf16 autocast on the CPU (no scaler needed).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main(argv=None) -> None:
    import timm
    from timm.utils import NativeScaler

    from sam_fused import MSAM
    from sam_fused.integrations.timm import OPTIMIZERS, create_optimizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--opt", default="sam_sgd", choices=sorted(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--layer-decay", type=float, default=None)
    p.add_argument("--rho", type=float, default=None, help="default: 0.05 for SAM/ASAM, 3 for Momentum-SAM")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--backend", default=None, help="sam_fused backend (default: the best available)")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on the CPU (auto: on with CUDA only)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes).to(device)
    extra = {} if args.rho is None else {"rho": args.rho}
    opt = create_optimizer(model, args.opt, lr=args.lr, weight_decay=args.weight_decay,
                           layer_decay=args.layer_decay, backend=args.backend, **extra)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    gen = torch.Generator().manual_seed(1)
    templates = torch.randn(args.classes, 3, args.img_size, args.img_size, generator=gen)

    def batch():
        y = torch.randint(0, args.classes, (args.batch_size,), generator=gen)
        x = templates[y] + 0.5 * torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
        return x.to(device), y.to(device)

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            return F.cross_entropy(model(x), y)

    held_out = batch()
    model.eval()
    with torch.no_grad():
        first = loss_of(*held_out).item()
    model.train()
    native = NativeScaler() if isinstance(opt, MSAM) and amp_dtype == torch.float16 else None
    for _ in range(args.steps):
        x, y = batch()
        if isinstance(opt, MSAM):  # one forward/backward per step, at the perturbed weights
            if native is not None:
                native(loss_of(x, y), opt, parameters=model.parameters())
            else:
                loss_of(x, y).backward()
                opt.step()
        else:  # SAM / ASAM: two passes
            scaler.scale(loss_of(x, y)).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            scaler.scale(loss_of(x, y)).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    model.eval()
    if isinstance(opt, MSAM):
        opt.restore()  # the end of training: back from the perturbed point to the weights themselves
    with torch.no_grad():
        last = loss_of(*held_out).item()
    print(f"timm {args.model}, {args.opt} (backend {opt.backend!r}), {args.steps} steps, AMP {amp_dtype or 'off'}: "
          f"held-out loss {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
