"""Command line: ``python -m ema_kernels {info,scale,bench,posthoc}``."""
from __future__ import annotations

import argparse
import platform
import sys

from . import _ops, scaling


def _info(args) -> int:
    import torch

    print(f"ema_kernels  {__import__('ema_kernels').__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton
        print(f"triton       {triton.__version__}")
    except ImportError as e:
        print(f"triton       not importable ({e})")
    gpu = torch.cuda.is_available()
    print(f"GPU          {torch.cuda.get_device_name(0) if gpu else 'none visible'}")
    ext = _extension_summary()
    if ext:
        print(f"extension    {ext}")
    for device_type in ("cpu", "cuda"):
        print(f"\nbackends for {device_type} tensors (auto picks the first available):")
        # on CPU also the test vehicles (Triton's interpreter, the CUDA kernels' emulation)
        extra = ("triton", "cuda") if device_type == "cpu" else ()
        for name in _ops._AUTO_ORDER[device_type] + extra:
            ok, why = _ops.availability(name, device_type)
            print(f"  {name:<10} {'available' if ok else 'unavailable'}: {why}")
    return 0


def _extension_summary() -> str:
    """What the compiled extension was built with, if the backend module can say."""
    try:
        from .backends import cuda as cuda_backend
    except ImportError:
        return ""
    describe = getattr(cuda_backend, "describe_extension", None)
    return describe() if describe is not None else ""


def _scale(args) -> int:
    k = args.kappa
    print(f"kappa = {k:g}")
    if args.ema_decay is not None:
        print(f"ema_decay     {args.ema_decay:.10g} -> {scaling.ema_decay(args.ema_decay, k):.10g}"
              f"   (rho**kappa)")
    if args.optimizer == "sgd":
        new = scaling.sgd(args.lr, k)
        print(f"lr            {args.lr:.6g} -> {new['lr']:.6g}   (lr*kappa)")
    else:
        new = scaling.adam(args.lr, tuple(args.betas), args.eps, args.weight_decay, k,
                           decoupled=args.optimizer == "adamw")
        print(f"lr            {args.lr:.6g} -> {new['lr']:.6g}   (lr*sqrt(kappa))")
        for i in range(2):
            print(f"beta{i + 1}         {args.betas[i]:.6g} -> {new['betas'][i]:.6g}"
                  f"   (1 - kappa*(1 - beta))")
        print(f"eps           {args.eps:.6g} -> {new['eps']:.6g}   (eps/sqrt(kappa))")
        rule = "(wd*sqrt(kappa))" if args.optimizer == "adamw" else "(L2: unchanged)"
        print(f"weight_decay  {args.weight_decay:.6g} -> {new['weight_decay']:.6g}   {rule}")
    print("\nOr let the optimizer do it: pass the base values and kappa=... "
          "(scale_optimizer=True is the default).")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # bench parses its own flags, in the order given
        from .bench import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m ema_kernels",
                                     description="Fused optimizer + EMA kernels.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and which backends work here (and why not)")
    sc = sub.add_parser("scale", help="print hyperparameters scaled for a batch-size factor kappa")
    sc.add_argument("--kappa", type=float, required=True, help="new batch / base batch")
    sc.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw")
    sc.add_argument("--lr", type=float, default=1e-3)
    sc.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    sc.add_argument("--eps", type=float, default=1e-8)
    sc.add_argument("--weight-decay", type=float, default=1e-2)
    sc.add_argument("--ema-decay", type=float, default=0.9999)
    sub.add_parser("bench", help="benchmark every backend against the torch baselines "
                                 "(python -m ema_kernels bench --help for its flags)")
    ph = sub.add_parser("posthoc", help="synthesise the EMA of any sigma_rel from power-EMA "
                                        "snapshots (EDM2 post-hoc EMA)")
    from . import posthoc
    posthoc.add_arguments(ph)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "info":
            return _info(args)
        if args.cmd == "posthoc":
            return posthoc.main(args)
        return _scale(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
