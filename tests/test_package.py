"""The package itself: the core stays NumPy-only; the console entry answers."""

from __future__ import annotations

import subprocess
import sys

import bnlab


def test_importing_the_core_does_not_import_torch() -> None:
    code = (
        "import sys, bnlab.core, bnlab.core.functional; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_version_and_help() -> None:
    version = subprocess.run([sys.executable, "-m", "bnlab", "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.strip() == f"bnlab {bnlab.__version__}"
    helptext = subprocess.run([sys.executable, "-m", "bnlab", "--help"], capture_output=True,
                              text=True, check=True).stdout
    assert "verify" in helptext
    assert "usage: bnlab" in helptext
