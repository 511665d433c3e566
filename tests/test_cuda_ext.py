"""The compiled extension's CUDA side.

Without a GPU (CI): the CUDA kernels are compiled in and registered when the build could build
them (CUDA build of torch + nvcc), importing the backends loads nothing, and asking for the
'cuda' backend fails with an error that says why.  On a GPU machine: the cpp matrix of
tests/test_cpp_backend.py runs on 'cuda', plus a CUDA-graph capture and replay of a step.
Without a GPU the same kernels run on CPU tensors through the emulation build:
tests/test_cuda_emulation.py.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import test_cpp_backend as M  # the shared matrix runner (tests/ is on sys.path under pytest)

NO_EXT = M.NO_EXT
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_GPU = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(NO_EXT, reason="EMA_KERNELS_NO_EXT=1: extension deliberately not "
                                              "built")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none visible here)")


def _cuda_expected() -> bool:
    """Whether setup.py would have compiled the CUDA kernels in this environment."""
    if os.environ.get("EMA_KERNELS_NO_CUDA", "").strip().lower() in ("1", "true"):
        return False
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _info():
    from ema_kernels.backends import cuda
    info = cuda.extension_info()
    if not info["built"]:
        pytest.fail(f"compiled extension unavailable: {info['error']}")
    return info


# ----------------------------------------------------------------------------------------------
# No GPU needed
# ----------------------------------------------------------------------------------------------
def _run_py(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_import_loads_nothing():
    r = _run_py(
        "import sys, torch\n"
        "import ema_kernels.backends.cuda, ema_kernels.backends.cpp\n"
        "assert 'ema_kernels._C' not in sys.modules, 'extension loaded at import'\n"
        "assert 'ema_kernels._C_emu' not in sys.modules, 'emulation loaded at import'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print('ok')\n")
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_missing_extension_gives_rebuild_hint():
    """A missing extension turns into an error naming the rebuild command, only when asked."""
    r = _run_py(
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ema_kernels._C':\n"
        "            raise ModuleNotFoundError(\"No module named 'ema_kernels._C'\")\n"
        "sys.meta_path.insert(0, Block())\n"
        "from ema_kernels.backends import cpp, cuda\n"
        "ok, why = cpp.availability('cpu'); assert not ok\n"
        "print('WHY', why)\n"
        "import torch\n"
        "try:\n"
        "    cpp.ema_only([torch.zeros(2)], [torch.zeros(2)], 0.5)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pip install --no-build-isolation -e ." in r.stdout
    assert "ERR backend 'cpp' cannot run" in r.stdout


@needs_ext
def test_cuda_ops_registered():
    info = _info()
    if not info["cuda"]:
        if _cuda_expected():
            pytest.fail("torch is a CUDA build and nvcc is on the PATH, but the extension was "
                        "built without CUDA kernels; rebuild: pip install --no-build-isolation -e .")
        pytest.skip("extension built CPU-only here (no CUDA torch or no nvcc at build time)")
    for op in ("adam_ema_", "adam_ema_capturable_", "sgd_ema_", "sgd_ema_capturable_",
               "ema_only_"):
        name = f"ema_kernels_ext::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name


@needs_ext
def test_info_shows_built_archs():
    info = _info()
    if not info["cuda"]:
        pytest.skip("extension built CPU-only here")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # the default build: sm_80, sm_90 + PTX
        assert info["cuda_archs"] == "8.0;9.0+PTX"
        assert info["cuda_arch_list"].replace(" ", "") == "800,900"
    assert int(info["cuda_version"]) >= 11000


@needs_ext
@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error path")
def test_cuda_backend_without_gpu_fails_clearly():
    from ema_kernels.backends import cuda
    info = _info()
    ok, why = cuda.availability("cuda")
    assert not ok
    if info["cuda"]:
        assert "no CUDA GPU" in why
    ok_cpu, why_cpu = cuda.availability("cpu")
    assert not ok_cpu and "CUDA tensors only" in why_cpu
    p = torch.randn(8)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        cuda.adam_ema([p], [p.clone()], [p.clone()], [p.abs()], None, None, lr=1e-3, beta1=0.9,
                      beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, maximize=False,
                      step_size=1e-3, bias_correction2_sqrt=1.0, ema_weight=None)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        cuda.ema_only([p], [p.clone()], 0.5)


@needs_ext
def test_cuda_op_on_cpu_tensors_dispatches_to_cpu():
    """The ops are device-generic; the cuda *backend* refuses CPU tensors (above), the op runs
    the CPU kernel for them."""
    _info()
    z, p = torch.zeros(5), torch.ones(5)
    torch.ops.ema_kernels_ext.ema_only_([z], [p], ema_weights=[0.5])
    assert torch.equal(z, torch.full((5,), 0.5))


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------
@needs_ext
@needs_gpu
@pytest.mark.parametrize("opt_name,dtype_name,size_name,mode_name", M.matrix())
def test_cuda_matches_reference(opt_name, dtype_name, size_name, mode_name):
    seed = random.randrange(1 << 30)
    try:
        M.run_case("cuda", "cuda", opt_name, dtype_name, size_name, mode_name, seed)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed})") from None


@needs_ext
@needs_gpu
@pytest.mark.parametrize("opt_name", ["adamw_amsgrad", "sgd_mom_damp_wd"])
def test_cuda_unaligned_views(opt_name):
    M.run_case("cuda", "cuda", opt_name, "bf16", "list", "ema", random.randrange(1 << 30),
               unaligned=True)


@needs_ext
@needs_gpu
def test_cuda_matches_cpp_bitwise():
    """Same fused_math.h, explicit roundings: the CPU twin and the GPU agree bit for bit."""
    from ema_kernels.backends import cpp, cuda
    n = 100003
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cpu = [torch.randn(n).to(dtype), torch.randn(n).to(dtype), 0.1 * torch.randn(n),
               0.01 * torch.rand(n), torch.randn(n)]
        gpu = [t.cuda() for t in cpu]
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=False,
                  maximize=False, step_size=1e-2, bias_correction2_sqrt=0.05, ema_weight=0.01)
        cpp.adam_ema([cpu[0]], [cpu[1]], [cpu[2]], [cpu[3]], None, [cpu[4]], **kw)
        cuda.adam_ema([gpu[0]], [gpu[1]], [gpu[2]], [gpu[3]], None, [gpu[4]], **kw)
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b.cpu()), dtype


@needs_ext
@needs_gpu
def test_cuda_list_spanning_many_launches():
    """More tensors and chunks than one resident wave of blocks: one persistent launch whose
    blocks walk several chunks each, over a device-resident work table."""
    sizes = [1, 65536 * 3 + 5] + [random.randint(1, 5000) for _ in range(100)] + [65536 * 330]
    from ema_kernels.backends import cuda
    p = [torch.randn(n, device="cuda") for n in sizes]
    z = [torch.zeros(n, device="cuda") for n in sizes]
    cuda.ema_only(p, z, 0.5)
    for a, b in zip(p, z):
        assert torch.equal(b, a * 0.5)


@needs_ext
@needs_gpu
@pytest.mark.parametrize("flat", [True, False])
def test_cuda_graph_capture_and_replay(flat):
    """Capture one capturable AdamW+EMA step in a CUDA graph; replay it with new lr / step /
    EMA weight / gradients written into the static tensors; compare with eager reference steps."""
    from ema_kernels.backends import cuda, reference
    dev = "cuda"
    sizes = [4099] if flat else [4099, 1, 70000, 33]
    p = [torch.randn(n, device=dev) for n in sizes]
    g = [torch.zeros(n, device=dev) for n in sizes]
    m = [torch.zeros(n, device=dev) for n in sizes]
    v = [torch.zeros(n, device=dev) for n in sizes]
    z = [t.clone() for t in p]
    lr_t = torch.zeros(1, device=dev)
    step_t = torch.zeros(1, device=dev)
    w_t = torch.zeros(1, device=dev)
    scale_t = torch.ones(1, device=dev)
    inf_t = torch.zeros(1, device=dev)
    beta1, beta2 = 0.9, 0.999
    kw = dict(beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=1e-2, decoupled=True,
              maximize=False)

    def step():
        cuda.adam_ema_capturable(p, g, m, v, None, z, lr=lr_t, step=step_t, ema_weight=w_t,
                                 grad_scale=scale_t, found_inf=inf_t, **kw)

    rp, rm, rv, rz = ([t.clone() for t in x] for x in (p, m, v, z))
    # warm up on a side stream (loads the extension, caches occupancy), then capture
    saved = [t.clone() for t in p + m + v + z]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    for t, b in zip(p + m + v + z, saved):
        t.copy_(b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t in range(1, 6):
        lr = 1e-2 * (0.5 ** t)
        lr32 = float(torch.tensor(lr, dtype=torch.float32))
        w = 1.0 / (t + 1)
        w32 = float(torch.tensor(w, dtype=torch.float32))
        grads = [torch.randn(n, device=dev) for n in sizes]
        found = 1.0 if t == 3 else 0.0
        for dst, src in zip(g, grads):
            dst.copy_(src)
        lr_t.fill_(lr)
        step_t.fill_(float(t))
        w_t.fill_(w)
        inf_t.fill_(found)
        graph.replay()
        before = [t.clone() for t in rp + rz]
        reference.adam_ema(rp, grads, rm, rv, None, rz, lr=lr32, step_size=lr32 / (1 - beta1 ** t),
                           bias_correction2_sqrt=math.sqrt(1 - beta2 ** t), ema_weight=w32,
                           grad_scale=scale_t, found_inf=inf_t, **kw)
        torch.cuda.synchronize()
        for i in range(len(sizes)):
            M.assert_rel(p[i], rp[i], before[i], f"graph replay {t} params[{i}]", 1e-6)
            M.assert_rel(z[i], rz[i], before[len(sizes) + i], f"graph replay {t} emas[{i}]",
                         1e-5)
        # continue from the reference state so every replay is compared from equal inputs
        for dst, src in zip(p + m + v + z, rp + rm + rv + rz):
            dst.copy_(src)


@needs_ext
@needs_gpu
def test_cuda_list_table_upload_refused_inside_a_capture():
    """A list launch whose work table is not cached would upload it inside a CUDA-graph capture
    (illegal there): refused with the way out; after one eager launch the capture reuses the
    cached table, and an eager step with the same tensors uploads nothing."""
    from ema_kernels.backends import cuda
    ops = torch.ops.ema_kernels_ext
    sizes = [4099, 1, 70000, 33]
    p = [torch.randn(n, device="cuda") for n in sizes]
    z = [torch.zeros(n, device="cuda") for n in sizes]

    def step():
        cuda.ema_only(p, z, 0.5)

    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="run one eager step"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step()
    step()  # eager: uploads the table
    uploads = list(ops.list_table_stats())[0]
    step()
    assert list(ops.list_table_stats())[0] == uploads, "a steady-state step uploads nothing"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t in z:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(p, z):
        assert torch.equal(b, a * 0.5)
