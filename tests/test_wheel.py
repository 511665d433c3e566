"""A built wheel installs and works: the package as a user gets it from `pip install`.

The wheel is built from a copy of the source tree (the checkout gets no build/ or egg-info)
without the compiled extension (``EMA_KERNELS_NO_EXT=1``: seconds, not minutes), installed
non-editable into a fresh venv, and imported from a directory outside the repository, where it
takes a step and ``python -m ema_kernels info`` runs. This catches a sub-package missing from
the wheel (``ema_kernels.optim`` once was: ``packages = [...]`` listed the others by hand).

torch is not reinstalled into the venv (gigabytes): a ``.pth`` file in the venv's site-packages
appends this interpreter's site-packages to ``sys.path``. Appended entries come after the venv's
own site-packages, and ``.pth`` files inside them are not processed, so an editable install of
ema_kernels there (its import finder is installed by such a ``.pth``) cannot leak in; the test
asserts that ``ema_kernels`` is imported from the venv.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                               "*.so", "*.pyc", ".pytest_cache", ".benchmarks", ".hypothesis",
                               "docs", "benchmarks")

STEP = """
import os, sys
import torch
import ema_kernels as ek
assert os.path.realpath(ek.__file__).startswith(os.path.realpath(sys.argv[1])), ek.__file__
import ema_kernels.optim, ema_kernels.backends  # noqa: F401  (the sub-packages)
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
opt = ek.AdamW(model.parameters(), lr=0.1, ema_decay=0.5)
model(torch.randn(4, 3)).sum().backward()
before = [p.detach().clone() for p in model.parameters()]
opt.step()
moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
ema = [e for e in opt.ema_parameters()]
# EMA = 0.5 * start + 0.5 * after: the step and the EMA update both ran
ok = all(torch.allclose(e, 0.5 * b + 0.5 * p.detach()) for e, b, p in
         zip(ema, before, model.parameters()))
print("STEP-OK", all(moved), ok, ek.__file__)
"""


def _run(cmd, cwd, env, timeout=120):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_wheel_installs_and_steps(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_SKIP)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(EMA_KERNELS_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(dist), str(src)], tmp_path, env, timeout=300)
    wheels = list(dist.glob("ema_kernels-*.whl"))
    assert len(wheels) == 1, list(dist.iterdir())
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    # every sub-package of the source tree is in the wheel
    for init in (REPO / "ema_kernels").rglob("__init__.py"):
        rel = init.relative_to(REPO).as_posix()
        assert rel in names, f"{rel} is missing from the wheel"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    vpy = venv / "bin" / "python"
    vsite = _run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                 tmp_path, env).strip()
    # torch, numpy, triton from this interpreter's site-packages, after the venv's own
    (Path(vsite) / "host_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps",
          "--no-index", str(wheels[0])], tmp_path, env, timeout=300)

    elsewhere = tmp_path / "elsewhere"  # not the repository: nothing importable from the cwd
    elsewhere.mkdir()
    out = _run([str(vpy), "-c", STEP, str(vsite)], elsewhere, env)
    assert "STEP-OK True True" in out, out
    info = _run([str(vpy), "-m", "ema_kernels", "info"], elsewhere, env)
    assert "ema_kernels" in info and "backends for cpu tensors" in info, info
    assert "reference  available" in info, info
