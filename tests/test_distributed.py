"""DDP and FSDP2 on CPU (gloo, 2 processes): results equal a single-process full-batch run.

Each worker writes its results to a file (queues between processes are unreliable here); the
test process compares them with a run of the same optimizer on the full batch.
"""
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ema_kernels as ek

WORLD = 2
STEPS = 4
RHO = 0.5


def make_model(seed):
    torch.manual_seed(seed)
    # Linear(16, 3) shards unevenly over 2 ranks (2 rows and 1 row).
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batches():
    g = torch.Generator().manual_seed(123)
    return [torch.randn(8, 8, generator=g) for _ in range(2 * STEPS)]


OPTS = {
    "adamw": lambda params: ek.AdamW(params, lr=5e-2, weight_decay=0.1, ema_decay=RHO,
                                     backend="reference"),
    "sgd": lambda params: ek.SGD(params, lr=5e-2, momentum=0.9, nesterov=True, ema_decay=RHO,
                                 ema_every=2, backend="reference"),
    # per-tensor trust ratios: under FSDP2 the shards' sums are all-reduced (optim/norms.py)
    "lars": lambda params: ek.LARS(params, lr=0.5, weight_decay=1e-2, trust_coefficient=0.02,
                                   ema_decay=RHO, backend="reference"),
    "lamb": lambda params: ek.LAMB(params, lr=5e-2, weight_decay=0.1, ema_decay=RHO,
                                   backend="reference"),
}
ROLES = {"adamw": 3, "sgd": 2, "lars": 2, "lamb": 3}  # fp32 state tensors + EMA per parameter


def train(model, opt, xs):
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _ddp(rank, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for name, make_opt in OPTS.items():
        for bucket_view in (False, True):
            model = DDP(make_model(0), gradient_as_bucket_view=bucket_view)
            opt = make_opt(model.parameters())
            xs = [x[rank * 4:(rank + 1) * 4] for x in batches()[:STEPS]]
            train(model, opt, xs)
            out[f"ddp-{name}-{bucket_view}"] = (
                [p.detach().clone() for p in model.parameters()],
                [e.clone() for e in opt.ema_parameters()])
    return out


def _fsdp(rank, tmp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}

    def sharded(seed):
        m = make_model(seed)
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    for name, make_opt in OPTS.items():
        xs = [x[rank * 4:(rank + 1) * 4] for x in batches()]
        model = sharded(0)
        opt = make_opt(model.parameters())
        params = list(model.parameters())
        emas = opt.ema_parameters()
        for p, e in zip(params, emas):
            assert isinstance(p, DTensor) and isinstance(e, DTensor)
            assert e.placements == p.placements and e.device_mesh == p.device_mesh
            assert e.shape == p.shape and e.to_local().shape == p.to_local().shape
        train(model, opt, xs[:STEPS // 2])
        # DCP round trip mid-run: a fresh model and optimizer resume identically.
        ckpt = os.path.join(tmp, f"dcp-{name}")
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=ckpt)
        model2 = sharded(99)
        opt2 = make_opt(model2.parameters())
        sd = {"model": model2.state_dict(), "optim": opt2.state_dict()}
        dcp.load(sd, checkpoint_id=ckpt)
        model2.load_state_dict(sd["model"])
        opt2.load_state_dict(sd["optim"])
        train(model, opt, xs[STEPS // 2:STEPS])
        train(model2, opt2, xs[STEPS // 2:STEPS])
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), "resumed run diverged"
        for p, q in zip(opt.ema_parameters(), opt2.ema_parameters()):
            assert torch.equal(p.to_local(), q.to_local()), "resumed EMA diverged"
        # swap_ema works on the shards
        before = [p.to_local().clone() for p in model.parameters()]
        with opt.swap_ema():
            for p, e in zip(model.parameters(), opt.ema_parameters()):
                assert torch.equal(p.to_local(), e.to_local().to(p.dtype))
            model(xs[0])  # a forward pass with the EMA weights (FSDP gathers them)
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p.to_local(), b)
        with pytest.raises(NotImplementedError, match="swap_ema"):
            opt.ema_module(model)
        state_bytes = sum(v.to_local().numel() * v.to_local().element_size()
                          for st in opt.state.values() for k, v in st.items()
                          if isinstance(v, DTensor))
        out[f"fsdp-{name}"] = ([_full(p.detach()).clone() for p in model.parameters()],
                               [_full(e).clone() for e in opt.ema_parameters()], state_bytes)
    return out


def _worker(rank, tmp, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {**_ddp(rank, tmp), **_fsdp(rank, tmp)}
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(tmp, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist"))
    try:
        mp.spawn(_worker, args=(tmp, _free_port()), nprocs=WORLD, join=True)
    except Exception:
        errs = [open(os.path.join(tmp, f)).read() for f in os.listdir(tmp) if f.endswith(".err")]
        pytest.fail("a distributed worker failed:\n" + "\n".join(errs))
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


def single_process(name, steps):
    model = make_model(0)
    opt = OPTS[name](model.parameters())
    train(model, opt, batches()[:steps])
    return [p.detach() for p in model.parameters()], opt.ema_parameters()


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_matches_single_process(results, name, bucket_view):
    params, emas = single_process(name, STEPS)
    for r in range(WORLD):
        got_p, got_e = results[r][f"ddp-{name}-{bucket_view}"]
        for a, b in zip(got_p, params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_e, emas):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTS))
def test_fsdp2_matches_single_process_and_shards_state(results, name):
    params, emas = single_process(name, STEPS)
    for r in range(WORLD):
        got_p, got_e, state_bytes = results[r][f"fsdp-{name}"]
        for a, b in zip(got_p, params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_e, emas):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # optimizer state + EMA per rank ∝ 1/world size (the two ranks hold disjoint shards)
    n = sum(p.numel() for p in params)
    roles = ROLES[name]  # (m, v, ζ) or (momentum, ζ), fp32
    total = sum(results[r][f"fsdp-{name}"][2] for r in range(WORLD))
    assert total == n * roles * 4
    assert max(results[r][f"fsdp-{name}"][2] for r in range(WORLD)) < 0.6 * total
