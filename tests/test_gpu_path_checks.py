"""Checks of the GPU path that CPU runs can make: a non-capturable step refuses a CUDA-graph
capture; Triton's step tables take only sets whose every address (θ, g, state, EMAs) is 16-byte
aligned, as its list kernel assumes. (What needs a GPU: tests/test_gpu_sync.py and the
capture test at the end, skipped here.)"""
from __future__ import annotations

import pytest
import torch

import ema_kernels as ek
from ema_kernels.optim import stepping


def test_a_non_capturable_step_inside_a_graph_capture_raises(monkeypatch):
    """Stands in for a capture on CPU: the capture query answers yes; nothing may move."""
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = ek.AdamW([p], lr=1e-2, ema_decay=0.9, backend="reference")
    before = p.detach().clone()
    ts = opt._ensure_sets()[0][0]
    monkeypatch.setattr(ts, "device", torch.device("cuda"))  # as if it held CUDA tensors
    monkeypatch.setattr(stepping, "_cuda_present", True)  # as if CUDA were here
    monkeypatch.setattr(stepping, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capturable=True"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.param_groups[0]["steps"] == 0


def test_cpu_sets_never_ask(monkeypatch):
    """An optimizer whose built sets are all on CPU makes no CUDA query (it costs tens of µs
    where no driver answers)."""
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    opt = ek.AdamW([p], lr=1e-2, ema_decay=0.9, backend="reference")
    opt.step()  # builds the sets
    monkeypatch.setattr(stepping, "_cuda_present", True)  # even where CUDA is present
    asked = []
    monkeypatch.setattr(stepping, "_capturing", lambda: asked.append(1) or False)
    opt.step()
    assert not asked


def _step_table_module():
    from ema_kernels.backends import _extension as ext
    try:
        ext.MAIN.load()
    except ext.ExtensionUnavailable as e:
        pytest.skip(f"the compiled extension is not built: {e}")
    import importlib
    return importlib.import_module(ext.MAIN.module)


@pytest.mark.parametrize("where", ["aligned", "state", "ema"])
def test_triton_tables_check_every_address_for_16_byte_alignment(where):
    mod = _step_table_module()
    n = (64, 36)
    params = [torch.nn.Parameter(torch.randn(k)) for k in n]
    for q in params:
        q.grad = torch.randn_like(q)

    def role(odd):  # fp32 tensors of the parameters' sizes; odd: views 4 bytes off alignment
        return [torch.zeros(k + 1)[1:] if odd else torch.zeros(k) for k in n]
    state = [role(where == "state"), role(False)]
    emas = [role(where == "ema")]
    table = mod.StepTable(params, torch.empty(0), [list(q.shape) for q in params],
                          [list(q.stride()) for q in params], state, emas, [0, 64], "triton")
    expected = mod.STATUS["ready"] if where == "aligned" else mod.STATUS["misaligned"]
    assert table.prepare() == expected
    # the C++ kernels' tables vectorise per span after their own check: no such refusal
    cpu = mod.StepTable(params, torch.empty(0), [list(q.shape) for q in params],
                        [list(q.stride()) for q in params], state, emas, [0, 64], "cpu")
    assert cpu.prepare() == mod.STATUS["ready"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a real capture)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_real_capture_of_a_non_capturable_step_raises(backend):
    if backend not in ek.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable here")
    p = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = ek.AdamW([p], lr=1e-2, ema_decay=0.9, backend=backend)
    opt.step()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(g):
            opt.step()


_PROBE = r"""
#include "fused_math.h"
extern "C" __global__ void probe(double lr, double wd, float* out) {
  ek::EmaWeights e = ek::make_ema_weights<float>(nullptr, 0);
  ek::AdamScalars s = ek::make_adam_scalars(lr, 0.9, 0.999, 1e-8, wd, true, false, 1e-3, 0.5, e);
  out[0] = s.decay;
}
"""


def test_the_device_rounds_the_decoupled_decay_as_the_host_does(tmp_path):
    """float(1 - lr*wd): nvcc would contract the double product and difference into one FMA on
    the device (a different float for some lr, wd) where the host and Python round twice. The
    PTX of the device's scalar set-up (csrc/fused_math.h, compiled for sm_90) must multiply
    and add separately, with round-to-nearest, and contain no f64 FMA."""
    import pathlib
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc (the CUDA toolkit) to compile the device code")
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    src = tmp_path / "probe.cu"
    src.write_text(_PROBE)
    out = tmp_path / "probe.ptx"
    subprocess.run([nvcc, "-ptx", "-arch=sm_90", "-std=c++17", f"-I{csrc}", str(src), "-o",
                    str(out)], check=True, capture_output=True, timeout=300)
    ptx = out.read_text()
    assert "fma.rn.f64" not in ptx
    assert "mul.rn.f64" in ptx and "add.rn.f64" in ptx
