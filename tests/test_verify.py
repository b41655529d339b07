"""``bnlab verify``: passes on the real core, and fails when the core is wrong."""

from __future__ import annotations

import numpy as np
import pytest

import bnlab.core.functional as F
from bnlab.cli import main
from bnlab.verify import Case, run_case, run_verify

pytestmark = pytest.mark.usefixtures("single_threaded")


def test_verify_passes_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm3d[3x2x2x3x2] float64 affine=False,track_running_stats=False" in out
    assert "forward" in out and "backward" in out and "running" in out
    assert "MISMATCH" not in out
    assert "checks passed" in out


def test_verify_fails_on_a_wrong_momentum_convention(monkeypatch: pytest.MonkeyPatch) -> None:
    real = F.update_running_stats

    def keras_convention(rm, rv, bm, bv, m):  # type: ignore[no-untyped-def]
        return real(rm, rv, bm, bv, 1.0 - m)  # "momentum" as the share kept: a classic bug

    monkeypatch.setattr(F, "update_running_stats", keras_convention)
    result = run_case(Case("BatchNorm1d", (8, 3), "float64", {"momentum": 0.1}))
    assert not result.ok
    assert any("running" in f for f in result.failures)
    lines: list[str] = []
    assert run_verify(seed=0, out=lines.append) == 1
    assert any("MISMATCH" in line for line in lines)


def test_verify_fails_on_a_biased_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    real = F.batch_norm_backward

    def off_by_a_little(dy, cache):  # type: ignore[no-untyped-def]
        dx, dw, db = real(dy, cache)
        return dx * (1 + 1e-6), dw, db

    monkeypatch.setattr(F, "batch_norm_backward", off_by_a_little)
    result = run_case(Case("BatchNorm2d", (4, 2, 3, 3), "float64", {}), seed=0)
    assert [f for f in result.failures if f.startswith("backward")]
    assert np.isfinite(result.errors["backward"])
