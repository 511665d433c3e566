"""Issue 4's CPU target, measured the way the issue states it.

ek.AdamW(backend="cpp").step() on 16M fp32 parameters in 64 tensors against
torch.optim.AdamW(fused=True).step() followed by torch._foreach_lerp_ for the EMA, timed
interleaved in one process (median of >= 9 rounds), plus an in-place streaming op (a.add_(b))
for the bandwidth fraction at 36 bytes per parameter.

    python benchmarks/cpu_target.py [--rounds 15] [--threads N]
"""
import argparse
import statistics
import time

import torch

import ema_kernels as ek


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.numel // args.tensors
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n)) for _ in range(args.tensors)]
    flat = [torch.nn.Parameter(torch.randn(n)) for _ in range(args.tensors)]
    theirs = [torch.nn.Parameter(torch.randn(n)) for _ in range(args.tensors)]
    opt = ek.AdamW(ours, lr=1e-4, ema_decay=0.9999, backend="cpp")  # default layout
    for p in ours:
        p.grad = torch.randn(n)
    opt_flat = ek.AdamW(flat, lr=1e-4, ema_decay=0.9999, backend="cpp", flatten=True)
    opt_flat.zero_grad(set_to_none=False)  # gradients: views of the flat buffer
    for p in flat:
        p.grad.normal_()
    for p in theirs:
        p.grad = torch.randn(n)
    t_opt = torch.optim.AdamW(theirs, lr=1e-4, fused=True)
    ema, plist = [p.detach().clone() for p in theirs], [p.detach() for p in theirs]
    a, b = torch.randn(args.numel), torch.randn(args.numel)

    def torch_step():
        t_opt.step()
        torch._foreach_lerp_(ema, plist, 1e-4)

    fns = {"ek.AdamW[cpp]": opt.step, "ek.AdamW[cpp,flat]": opt_flat.step,
           "torch fused + _foreach_lerp_": torch_step,
           "a.add_(b)": lambda: a.add_(b)}
    for f in fns.values():
        f(), f()
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    stream = 12 * args.numel / med["a.add_(b)"]
    print(f"threads={torch.get_num_threads()} numel={args.numel} tensors={args.tensors} "
          f"rounds={args.rounds}")
    for k, t in med.items():
        bpp = 12 if k == "a.add_(b)" else 36
        print(f"  {k:<30} {t * 1e3:8.2f} ms  {bpp * args.numel / t / 1e9:6.1f} GB/s "
              f"(at {bpp} B/param)")
    for k in ("ek.AdamW[cpp]", "ek.AdamW[cpp,flat]"):
        ours_bw = 36 * args.numel / med[k]
        print(f"  {k}: speedup vs torch fused + lerp "
              f"{med['torch fused + _foreach_lerp_'] / med[k]:.2f}x;  "
              f"bandwidth {100 * ours_bw / stream:.0f}% of a.add_(b)")


if __name__ == "__main__":
    main()
