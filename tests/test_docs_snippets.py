"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot rot.

Each block runs in a fresh namespace (in this process: a subprocess per block would spend most
of the test importing torch) from a temporary working directory, after a small preamble that
gives it what a page's prose assumes: ``torch``, ``nn``, ``ek`` and a tiny ``model`` with
``evaluate(model)``. An HTML comment on the line before a block changes how it runs:

- ``<!-- snippet: continues -->``: runs together with the previous block of the page (after it,
  in the same namespace), not on its own;
- ``<!-- snippet: needs-gpu -->`` / ``<!-- snippet: multi-process -->``: skipped, with that
  reason (no GPU and a single process here).

docs/*.md is globbed when the tests are collected, so every page added later is covered.
"""
from __future__ import annotations

import contextlib
import pathlib
import re
import sys

import pytest

from integration_support import require

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
MARKS = ("continues", "needs-gpu", "multi-process")
SKIP = {"needs-gpu": "needs a GPU (none here or in CI)",
        "multi-process": "needs several processes (torchrun)"}

PREAMBLE = '''
import torch
import torch.nn as nn
import ema_kernels as ek

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def evaluate(model):
    """The held-out loss of ``model`` on a fixed batch (what a page's 'evaluate' stands for)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(torch.ones(4, 8)).square().mean().item()
    model.train(was_training)
    return loss
'''

# The optional frameworks docs/integrations.md imports: absent, its blocks skip as
# tests/test_integrations_*.py do (and fail under CI, where the extra must be installed).
EXTRAS = ("transformers", "accelerate", "lightning", "diffusers", "timm", "ema_pytorch",
          "safetensors")
_IMPORT = re.compile(r"^\s*(?:from|import)\s+(\w+)", re.M)

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_MARK = re.compile(r"<!--\s*snippet:\s*([\w-]+)\s*-->\s*$")


def _blocks(page: pathlib.Path):
    """``(line, mark or None, code)`` of each python block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        name = mark.group(1) if mark else None
        if name is not None and name not in MARKS:
            raise ValueError(f"{page.name}: unknown snippet mark {name!r} before the block at "
                             f"line {text.count(chr(10), 0, m.start()) + 1}; use one of {MARKS}")
        out.append((text.count("\n", 0, m.start()) + 1, name, m.group(1)))
    return out


def _snippets():
    """One pytest param per runnable unit: a block plus the blocks that continue it."""
    params = []
    for page in PAGES:
        units = []
        for line, mark, code in _blocks(page):
            if mark == "continues":
                if not units:
                    raise ValueError(f"{page.name}:{line}: 'continues' on the page's first block")
                units[-1][2].append((line, code))
            else:
                units.append([line, mark, [(line, code)]])
        rel = page.relative_to(ROOT).as_posix()
        for line, mark, parts in units:
            marks = [pytest.mark.skip(reason=SKIP[mark])] if mark in SKIP else []
            params.append(pytest.param(rel, parts, id=f"{rel}:{line}", marks=marks))
    return params


def test_pages_found():
    """README and the guides it links exist and have snippets (a wrong glob passes vacuously)."""
    assert (ROOT / "README.md").exists()
    assert len(PAGES) > 1, "no docs/*.md found"
    assert len(_snippets()) >= len(PAGES), "fewer python blocks than pages"


def test_marks_are_parsed(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- snippet: needs-gpu -->\n```python\nx = 1\n```\n\n"
                    "```python\ny = 2\n```\n<!-- snippet: typo -->\n", encoding="utf-8")
    assert [(mark, code) for _, mark, code in _blocks(page)] == \
        [("needs-gpu", "x = 1\n"), (None, "y = 2\n")]
    page.write_text("<!-- snippet: typo -->\n```python\nx = 1\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown snippet mark 'typo'"):
        _blocks(page)


@contextlib.contextmanager
def _fresh_accelerate():
    """accelerate keeps process-wide singletons (``AcceleratorState``): a block that builds an
    ``Accelerator`` (or a transformers ``Trainer``, through it) would see the settings of an
    earlier block in this process, where a script starts fresh. Reset them around each block."""
    def reset():
        if "accelerate.state" in sys.modules:
            from accelerate.state import AcceleratorState, GradientState
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    reset()
    try:
        yield
    finally:
        reset()


@pytest.mark.parametrize("page, parts", _snippets())
def test_snippet_runs(page, parts, tmp_path, monkeypatch):
    for module in sorted({m for _, code in parts for m in _IMPORT.findall(code)} &
                         set(EXTRAS)):
        require(module)
    monkeypatch.chdir(tmp_path)  # snippets that save files write them here
    monkeypatch.delenv("EMA_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored after (a block may set it itself)
    namespace = {"__name__": "__snippet__"}
    exec(compile(PREAMBLE, "<preamble>", "exec"), namespace)
    with _fresh_accelerate():
        for line, code in parts:
            # the block's own line numbers in tracebacks: pad to where it starts in the page
            exec(compile("\n" * line + code, f"{page}", "exec"), namespace)
