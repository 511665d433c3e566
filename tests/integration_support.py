"""Shared by tests/test_integrations_*.py: import a framework, or skip when it is not installed.

The integration tests run against the real packages (``pip install -e .[integrations]``, which
scripts/setup.sh installs). Without the extra they skip, saying so; under CI (``CI`` set) a
missing package fails instead, because there the extra must be installed. A package that is
installed but fails to import always fails: only a truly absent package skips.
"""
import importlib
import os

import pytest


def require(module: str, package: str = None):
    """``import module`` (the PyPI name ``package``), skipping the test module if absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (e.name == module or module.startswith(f"{e.name}.")):
            raise  # installed, but one of its own imports is missing: a real failure
        msg = (f"{package or module} is not installed: the integration tests need the "
               f"'integrations' extra (pip install -e '.[integrations]')")
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI must install it (scripts/setup.sh)", pytrace=False)
        pytest.skip(msg, allow_module_level=True)
