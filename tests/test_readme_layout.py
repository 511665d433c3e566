"""README's "Layout" section matches the tree: every file it names exists, and every module of
the package and every source in csrc/ is named there (a new module must be placed in it)."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
_FILE = re.compile(r"[\w./-]+\.(?:py|h|cu|cpp|md|sh|toml)\b")


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md has no '## Layout' section with a code block"
    return m.group(1)


def named_files(block: str):
    """Paths (relative to the repository) of the files the block names. A line whose first
    word ends in '/' opens that folder at its indentation; deeper lines are inside it."""
    stack = []  # (indent, folder)
    out = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        first = line.split()[0]
        if first.endswith("/"):
            parent = stack[-1][1] if stack else ""
            stack.append((indent, parent + first))
        folder = stack[-1][1] if stack else ""
        for name in _FILE.findall(line):
            rooted = (ROOT / name).exists() and "/" in name
            out.add(name if rooted else folder + name)
    return out


def test_every_named_file_exists():
    missing = sorted(p for p in named_files(_layout_block()) if not (ROOT / p).exists())
    assert not missing, f"README's Layout names files that do not exist: {missing}"


def test_every_module_and_source_is_named():
    named = named_files(_layout_block())
    files = [p for p in (ROOT / "ema_kernels").rglob("*.py")
             if p.name != "__init__.py" or p.parent.name == "ema_kernels"]
    files += [p for p in (ROOT / "csrc").iterdir() if p.is_file()]
    unnamed = sorted(p.relative_to(ROOT).as_posix() for p in files
                     if p.relative_to(ROOT).as_posix() not in named)
    assert not unnamed, f"files missing from README's Layout section: {unnamed}"


def test_parser_follows_folders():
    block = "pkg/\n  a.py  b.py     text\n  sub/\n    c.py\nd.md  e/f.py\n"
    assert named_files(block) == {"pkg/a.py", "pkg/b.py", "pkg/sub/c.py", "d.md", "e/f.py"}
