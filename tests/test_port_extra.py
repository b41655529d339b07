"""Without the port extra, bnlab and its other commands work; bnlab.port names the extra."""

from __future__ import annotations

import subprocess
import sys

# Blocks the frameworks of the extra in a fresh interpreter (an import of any raises).
BLOCK = ("import sys\n"
         "for m in ('jax', 'jaxlib', 'flax', 'keras', 'onnx', 'onnxruntime'):\n"
         "    sys.modules[m] = None\n")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True,
                          text=True, timeout=120)


def test_bnlab_and_bnlab_port_import_without_any_framework() -> None:
    r = _run("import bnlab, bnlab.port, bnlab.core\n"
             "heavy = [m for m in ('jax', 'flax', 'keras', 'onnx', 'onnxruntime', 'torch')\n"
             "         if sys.modules.get(m) is not None]\n"
             "print(heavy)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_importing_bnlab_port_imports_no_framework_even_when_installed() -> None:
    code = ("import sys, bnlab, bnlab.port\n"
            "print([m for m in ('jax', 'flax', 'keras', 'onnx', 'onnxruntime', 'torch')"
            " if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_conversion_without_the_extra_names_it_in_one_line() -> None:
    r = _run("import numpy as np\n"
             "from bnlab.errors import BnlabError\n"
             "from bnlab.port import BNState, to_keras, to_flax, to_onnx\n"
             "s = BNState(weight=None, bias=None, mean=np.zeros(2), var=np.ones(2))\n"
             "for f in (to_keras, to_flax, to_onnx):\n"
             "    try:\n"
             "        f(s)\n"
             "    except BnlabError as e:\n"
             "        print(e)\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, name in zip(lines, ("keras", "flax", "onnx"), strict=True):
        assert line.startswith(f"bnlab.port needs {name}") and "pip install 'bnlab[port]'" in line


def test_the_cli_without_the_extra() -> None:
    r = _run("from bnlab.cli import main\n"
             "print(main(['models']))\n"
             "raise SystemExit(main(['port', 'table']))\n")
    assert r.returncode == 2
    assert "seed_cnn" in r.stdout  # another command still works
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnlab port: error: bnlab.port needs jax")
    assert "pip install 'bnlab[port]'" in err[0]
