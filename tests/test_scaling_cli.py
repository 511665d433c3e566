"""The scaling rules, the backend registry and the command line."""
import os
import subprocess
import sys

import pytest
import torch

import ema_kernels as ek
from ema_kernels import _ops, scaling


def test_ema_decay_rule():
    assert scaling.ema_decay(0.999, 8) == pytest.approx(0.999 ** 8)
    assert scaling.ema_decay(0.0, 3) == 0.0 and scaling.ema_decay(1.0, 3) == 1.0
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="ema_decay"):
            scaling.ema_decay(bad, 2)
    for bad in (0, -1, float("inf")):
        with pytest.raises(ValueError, match="kappa"):
            scaling.ema_decay(0.9, bad)


def test_sgd_rule():
    assert scaling.sgd(0.1, 4) == {"lr": pytest.approx(0.4)}
    assert scaling.sgd(0.1, 4, momentum=0.9)["momentum"] == 0.9


def test_adam_rule():
    out = scaling.adam(1e-3, (0.9, 0.999), 1e-8, 0.1, kappa=4)
    assert out["lr"] == pytest.approx(2e-3)
    assert out["betas"] == (pytest.approx(0.6), pytest.approx(0.996))
    assert out["eps"] == pytest.approx(5e-9)
    assert out["weight_decay"] == pytest.approx(0.2)
    # lr * weight decay scales by kappa for AdamW: the per-step shrinkage follows the SGD rule
    assert out["lr"] * out["weight_decay"] == pytest.approx(4 * 1e-3 * 0.1)
    assert scaling.adam(1e-3, (0.9, 0.999), 1e-8, 0.1, kappa=4, decoupled=False)[
        "weight_decay"] == 0.1
    assert scaling.adam(1e-3, (0.9, 0.999), 1e-8, 0.0, kappa=10)["betas"][0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"beta1=0.9.*kappa <= 10"):
        scaling.adam(1e-3, (0.9, 0.999), 1e-8, 0.0, kappa=11)
    with pytest.raises(ValueError, match="kappa"):
        scaling.adam(1e-3, kappa=0)


def test_available_backends_and_errors(monkeypatch):
    assert "reference" in ek.available_backends("cpu")
    assert ek.available_backends("cpu")[-1] in ("reference", "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        _ops.availability("magic", "cpu")
    # A backend asked for by name that cannot run raises, never falls back.
    with pytest.raises(ek.BackendUnavailableError, match="cuda"):
        _ops.resolve("cuda", "cpu")
    monkeypatch.setenv("EMA_KERNELS_BACKEND", "reference")
    assert _ops.resolve("auto", "cpu").NAME == "reference"
    monkeypatch.setenv("EMA_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="EMA_KERNELS_BACKEND"):
        _ops.resolve("auto", "cpu")


def test_env_backend_reads_what_os_environ_holds(monkeypatch):
    monkeypatch.delenv(_ops.ENV_VAR, raising=False)
    assert _ops.env_backend() is None
    monkeypatch.setenv(_ops.ENV_VAR, "reference")
    assert _ops.env_backend() == "reference" == os.environ.get(_ops.ENV_VAR)
    monkeypatch.delenv(_ops.ENV_VAR)
    assert _ops.env_backend() is None


def test_env_override_reaches_the_optimizer(monkeypatch):
    monkeypatch.setenv("EMA_KERNELS_BACKEND", "cuda")  # cannot run on CPU tensors
    p = torch.nn.Parameter(torch.randn(4))
    opt = ek.AdamW([p])
    p.grad = torch.full_like(p, 1.0)
    with pytest.raises(ek.BackendUnavailableError, match="cannot run on cpu"):
        opt.step()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ema_kernels", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_info_and_scale():
    info = _cli("info")
    assert info.returncode == 0, info.stderr
    assert "torch" in info.stdout and "reference  available" in info.stdout
    for name in ("cpp", "triton", "cuda"):
        assert name in info.stdout
    out = _cli("scale", "--kappa", "4", "--optimizer", "adamw", "--lr", "1e-3",
               "--weight-decay", "0.1", "--ema-decay", "0.999")
    assert out.returncode == 0, out.stderr
    assert f"{0.999 ** 4:.10g}" in out.stdout and "0.002" in out.stdout and "0.6" in out.stdout
    sgd = _cli("scale", "--kappa", "8", "--optimizer", "sgd", "--lr", "0.1")
    assert "0.8" in sgd.stdout
    bad = _cli("scale", "--kappa", "100", "--optimizer", "adam")
    assert bad.returncode == 2 and "beta1" in bad.stderr


def test_auto_prefers_cuda_then_triton_for_cuda_tensors(monkeypatch):
    """auto on CUDA tensors: the extension when built, else Triton (no GPU needed to check)."""
    real = _ops.availability
    state = {"cuda": (True, "built"), "triton": (True, "ok"), "reference": (True, "ok")}
    monkeypatch.setattr(_ops, "availability",
                        lambda name, dt: state[name] if dt == "cuda" else real(name, dt))
    monkeypatch.delenv("EMA_KERNELS_BACKEND", raising=False)
    assert _ops.resolve("auto", "cuda").NAME == "cuda"
    state["cuda"] = (False, "extension not built")
    assert _ops.resolve("auto", "cuda").NAME == "triton"
    state["triton"] = (False, "no triton")
    assert _ops.resolve("auto", "cuda").NAME == "reference"
