"""ema_kernels inside PyTorch's distributed engines: DDP and FSDP2, with a sharded EMA.

    torchrun --nproc-per-node 2 examples/ddp_fsdp.py --engine fsdp
    torchrun --nproc-per-node 2 examples/ddp_fsdp.py --engine ddp

Runs on CPUs (gloo) or GPUs (nccl, one per process) unchanged. Under FSDP2 the optimizer
updates the local shards in place and keeps its state and the EMA as DTensors laid out like the
parameters: each rank holds 1/world of them, and step() never all-gathers. The checkpoint is
written with torch.distributed.checkpoint and read back into a fresh model and optimizer.
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import ema_kernels as ek


def build_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width), torch.nn.GELU(),
                               torch.nn.Linear(width, 1))


def wrap(model, engine, device, mesh):
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    model.to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def state_bytes(opt) -> int:
    """Bytes of optimizer state + EMA this rank holds."""
    total = 0
    for st in opt.state.values():
        for key, v in st.items():
            if key != "step":  # the step counters are scalars
                t = _local(v)
                total += t.numel() * t.element_size()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("ddp", "fsdp"), default="fsdp")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--kappa", type=float, default=1.0, help="batch scale vs the tuned batch")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda \
        else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))

    model = wrap(build_model(args.width), args.engine, device, mesh)
    # Build the optimizer after wrapping: DDP keeps the parameters (we pack them into flat
    # buffers); FSDP2 owns its shards (we read and write them where they lie).
    opt = ek.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, ema_decay=0.99,
                   kappa=args.kappa)
    g = torch.Generator(device="cpu").manual_seed(1 + rank)
    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 32, generator=g)
        y = torch.sin(x @ w_true)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if step % 10 == 0 and rank == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    with opt.swap_ema():  # evaluate the EMA weights (sharded under FSDP2)
        x = torch.randn(256, 32, generator=torch.Generator().manual_seed(7))
        ema_loss = torch.nn.functional.mse_loss(model(x.to(device)),
                                                torch.sin(x @ w_true).to(device))
    mem = torch.tensor([state_bytes(opt)], dtype=torch.float64)
    all_mem = [torch.zeros_like(mem) for _ in range(world)]
    dist.all_gather(all_mem, mem)
    if rank == 0:
        print(f"EMA model loss {ema_loss.item():.4f}")
        print("optimizer state + EMA per rank (MiB): "
              + ", ".join(f"{m.item() / 2**20:.3f}" for m in all_mem))

    # Checkpoint with torch.distributed.checkpoint, resume into a fresh model and optimizer.
    ckpt = os.path.join(tempfile.gettempdir(), f"ema_kernels_{args.engine}_ckpt")
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=ckpt)
    model2 = wrap(build_model(args.width), args.engine, device, mesh)
    opt2 = ek.AdamW(model2.parameters(), lr=1e-3, weight_decay=0.05, ema_decay=0.99,
                    kappa=args.kappa)
    sd = {"model": model2.state_dict(), "optim": opt2.state_dict()}
    dcp.load(sd, checkpoint_id=ckpt)
    model2.load_state_dict(sd["model"])
    opt2.load_state_dict(sd["optim"])
    same = all(torch.equal(_local(a), _local(b)) for a, b in
               zip(opt.ema_parameters(), opt2.ema_parameters()))
    if rank == 0:
        print(f"checkpoint round trip: EMA restored exactly: {same}")
    dist.destroy_process_group()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


if __name__ == "__main__":
    main()
