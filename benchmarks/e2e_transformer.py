"""End to end: one training step of a small transformer on CPU, and the EMA's share of it.

    python benchmarks/e2e_transformer.py [--steps 30] [--png benchmarks/results/e2e_transformer_1thread.png]

The same model (same init, same batch) is trained by three optimizers, each step timed in phases
with ``time.perf_counter`` (medians over 2 x ``--steps`` steps after a warm-up; the runs
take their steps in turns, so a busy machine slows them alike):

- ``torch AdamW(foreach|fused) + timm EMAv3``: ``torch.optim.AdamW(foreach=True)`` (PyTorch's
  default on GPUs) or ``fused=True``, then ``timm.utils.ModelEmaV3.update`` (timm itself: walk
  both ``state_dict()``s, one ``torch._foreach_lerp_``), timed as its own phase (needs timm:
  ``pip install 'ema-kernels[integrations]'``);
- ``ek.AdamW``: ``ema_kernels.AdamW`` — step and EMA in one pass. To time its EMA inside the
  fused step it runs with ``ema_every=2``: odd steps move no EMA bytes, even steps update it,
  so EMA cost = median(EMA step) − median(plain step), from interleaved steps of one run.

Prints a Markdown table (forward+backward, optimizer step, EMA, total, EMA share of the step)
and, with ``--png``, a stacked-bar figure (matplotlib, optional).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn as nn

import ema_kernels as ek

EMA_DECAY = 0.9999


class TinyLM(nn.Module):
    def __init__(self, vocab=1024, d=256, heads=4, layers=4, ff=1024, seq=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(self.norm(self.body(h)))


class Trainer:
    """One model + optimizer (+ EMA); ``kind``: "torch-foreach", "torch-fused" or "ek"."""

    def __init__(self, kind: str, base: nn.Module, batch):
        self.kind = kind
        self.model = copy.deepcopy(base)
        self.x, self.y = batch
        self.loss_fn = nn.CrossEntropyLoss()
        self.ema_model = None
        if kind.startswith("torch"):
            mode = kind.split("-")[1]
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **{mode: True})
            try:
                from timm.utils import ModelEmaV3
            except ModuleNotFoundError as e:
                raise SystemExit(f"the torch rows need timm's ModelEmaV3 ({e}): pip install "
                                 f"timm, or pip install 'ema-kernels[integrations]'") from None
            self.ema_model = ModelEmaV3(self.model, decay=EMA_DECAY)
        else:
            self.opt = ek.AdamW(self.model.parameters(), lr=1e-4, ema_decay=EMA_DECAY,
                                ema_every=2)
        self.fb, self.st, self.st_ema, self.em = [], [], [], []
        self.steps = 0

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(self.x).flatten(0, 1), self.y.flatten())
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        if self.ema_model is not None:
            with torch.no_grad():
                self.ema_model.update(self.model)
        t3 = time.perf_counter()
        self.steps += 1
        if record:
            self.fb.append(t1 - t0)
            # ek (ema_every=2): even-numbered steps update the EMA, odd ones do not
            is_ema_step = self.kind == "ek" and self.steps % 2 == 0
            (self.st_ema if is_ema_step else self.st).append(t2 - t1)
            self.em.append(t3 - t2)

    def result(self) -> dict:
        med = lambda v: statistics.median(v) * 1e3  # noqa: E731
        out = {"fwd_bwd_ms": med(self.fb), "step_ms": med(self.st), "ema_ms": med(self.em)}
        if self.kind == "ek":
            out["ema_ms"] = max(0.0, med(self.st_ema) - out["step_ms"])
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--png", default=None, help="write a stacked-bar figure (matplotlib)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = TinyLM(seq=args.seq)
    n_params = sum(p.numel() for p in base.parameters())
    n_tensors = len(list(base.parameters()))
    x = torch.randint(0, 1024, (args.batch, args.seq))
    y = torch.randint(0, 1024, (args.batch, args.seq))
    backend = ek.available_backends("cpu")[0]
    print(f"TinyLM: {n_params / 1e6:.2f}M parameters in {n_tensors} tensors, batch "
          f"{args.batch}x{args.seq} tokens, CPU, {torch.get_num_threads()} threads, "
          f"ema_kernels backend '{backend}'", file=sys.stderr)

    labels = {"torch-foreach": "torch AdamW(foreach) + timm EMAv3",
              "torch-fused": "torch AdamW(fused) + timm EMAv3",
              "ek": f"ek.AdamW[{backend}] (step+EMA fused)"}
    trainers = {kind: Trainer(kind, base, (x, y)) for kind in labels}
    # Lockstep: one step of each in turn, so a busy machine slows all of them alike.
    total = 2 * (args.warmup + args.steps)
    for i in range(total):
        for tr in trainers.values():
            tr.step(record=i >= 2 * args.warmup)
        if (i + 1) % 10 == 0 or i + 1 == total:
            print(f"  step {i + 1}/{total}", file=sys.stderr, flush=True)
    rows = [dict(name=labels[kind], **tr.result()) for kind, tr in trainers.items()]
    print("| run | fwd+bwd ms | optimizer ms | EMA ms | total ms | EMA share |")
    print("|:---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["total_ms"] = r["fwd_bwd_ms"] + r["step_ms"] + r["ema_ms"]
        r["ema_share_pct"] = 100.0 * r["ema_ms"] / r["total_ms"]
        print(f"| {r['name']} | {r['fwd_bwd_ms']:.2f} | {r['step_ms']:.2f} | "
              f"{r['ema_ms']:.2f} | {r['total_ms']:.2f} | {r['ema_share_pct']:.1f}% |")
    print(f"\n(medians over {2 * args.steps} steps, the runs in lockstep; ek's EMA ms = median "
          f"EMA step − median plain step, ema_every=2; {n_params / 1e6:.2f}M params in "
          f"{n_tensors} tensors)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--png needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
        fig, ax = plt.subplots(figsize=(8.5, 3.3))
        names = [r["name"] for r in rows]
        left = [0.0] * len(rows)
        for key, label, color in (("fwd_bwd_ms", "forward+backward", "#9db4d0"),
                                  ("step_ms", "optimizer step", "#3b6ea5"),
                                  ("ema_ms", "EMA update", "#e07b39")):
            vals = [r[key] for r in rows]
            ax.barh(names, vals, left=left, label=label, color=color)
            left = [a + b for a, b in zip(left, vals)]
        for i, r in enumerate(rows):
            ax.text(left[i], i, f"  EMA {r['ema_share_pct']:.1f}%", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per training step (median)")
        ax.set_title(f"TinyLM {n_params / 1e6:.1f}M params, CPU ({torch.get_num_threads()} "
                     f"thread(s)): the EMA's share of a training step", fontsize=10)
        ax.set_xlim(0, max(left) * 1.25)
        ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3),
                  frameon=False)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
