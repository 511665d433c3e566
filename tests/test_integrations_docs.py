"""Every example of docs/integrations.md runs as it is (in a temporary folder)."""
import os
import re
import runpy
from pathlib import Path

import pytest

from integration_support import require

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
EXAMPLES = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
            if not b.lstrip().startswith("def ")]  # (a method to paste into a module, not a script)
NEEDS = {"transformers": ("transformers", "accelerate", "safetensors"),
         "lightning": ("lightning",), "accelerate": ("accelerate",), "diffusers": ()}


def _kind(code):
    for kind in ("transformers", "lightning", "accelerate", "diffusers"):
        if f"integrations.{kind}" in code or f"from {kind} import" in code:
            return kind
    raise AssertionError(f"an example of no known framework:\n{code}")


def test_docs_have_one_example_per_framework():
    assert sorted(_kind(c) for c in EXAMPLES) == ["accelerate", "diffusers", "lightning",
                                                   "transformers"]


@pytest.mark.parametrize("code", EXAMPLES, ids=[_kind(c) for c in EXAMPLES])
def test_docs_example_runs(code, tmp_path, monkeypatch):
    for module in NEEDS[_kind(code)]:
        require(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if _kind(code) == "accelerate":  # a process-wide singleton: this example makes its own
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    path = tmp_path / "example.py"
    path.write_text(code)
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        if _kind(code) == "accelerate":
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    assert os.listdir(tmp_path)  # it wrote what it says (checkpoints, state) or at least itself
