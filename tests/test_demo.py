"""`bnlab demo` smoke test on the bundled digits: table, plot and files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.errors import BnlabError


def test_demo_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--dataset", "digits", "--steps", "12", "--eval-every", "4",
            "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| lr | norm | acc @" in text and "steps to 97 %" in text
    assert text.count("| 0.01 |") == 2 and text.count("| 0.5 |") == 2
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    doc = json.loads((out / "demo.json").read_text())
    assert doc["dataset"] == "digits" and len(doc["runs"]) == 4
    assert {(r["lr"], r["norm"]) for r in doc["runs"]} == {
        (0.01, "bn"), (0.01, "none"), (0.5, "bn"), (0.5, "none")}
    assert all([m["step"] for m in r["metrics"]][-1] == 12 or r["diverged"]
               for r in doc["runs"])
    assert (out / "table.md").read_text().startswith("| lr | norm |")
    assert main(argv) == 0  # a previous demo's folder is reused


def test_demo_refuses_foreign_folder(tmp_path: Path) -> None:
    from bnlab.demo import run_demo

    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(BnlabError, match="not empty"):
        run_demo(tmp_path, dataset="digits", steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_demo_falls_back_to_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from bnlab.demo import run_demo

    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("BNLAB_MIRRORS", "http://127.0.0.1:9/")
    doc = run_demo(tmp_path / "d", steps=3, eval_every=3, threads=1, progress=False)
    assert doc["dataset"] == "digits"
    assert "MNIST is not available" in doc["note"]
    assert "using scikit-learn's bundled 8x8 digits" in capsys.readouterr().out
