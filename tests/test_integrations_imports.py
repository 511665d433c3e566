"""``import ema_kernels`` never imports a training framework: the integrations are lazy."""
import subprocess
import sys

FRAMEWORKS = ("transformers", "accelerate", "lightning", "pytorch_lightning", "diffusers",
              "timm", "ema_pytorch")


def test_import_ema_kernels_imports_no_framework():
    code = ("import sys, ema_kernels, ema_kernels.integrations, ema_kernels.bench; "
            f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
