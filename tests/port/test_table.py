"""The committed behaviour table is what `bnlab port table` measures on the installed frameworks."""

from __future__ import annotations

from pathlib import Path

from bnlab.cli import main

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "port" / "behaviour.md"


def _body(text: str) -> list[str]:
    """The table without its first line (the versions it was measured with)."""
    return text.splitlines()[1:]


def test_behaviour_table_regenerates_identically(tmp_path: Path) -> None:
    out = tmp_path / "behaviour.md"
    assert main(["port", "table", "--out", str(out)]) == 0
    fresh, committed = out.read_text(), COMMITTED.read_text()
    assert fresh.splitlines()[0].startswith("Measured with torch ")
    assert _body(fresh) == _body(committed), (
        "the frameworks behave differently from the committed table; installed: "
        f"{fresh.splitlines()[0]}; committed: {committed.splitlines()[0]}. Regenerate it "
        "with: bnlab port table --out docs/port/behaviour.md"
    )
    readme = (COMMITTED.parents[2] / "README.md").read_text()
    assert all(line in readme for line in committed.splitlines() if line), "README's copy"
    # The measured facts bnlab.port's conversions rely on.
    rows = {line.split(" | ")[0].strip("| "): line for line in fresh.splitlines()
            if line.startswith("| ")}
    assert "unbiased" in rows["running variance tracks (measured)"].split(" | ")[1]
    assert rows["= torch momentum"].split(" | ")[1:] == ["0.1", "0.01", "0.01", "0.01", "0.1 |"]


def test_port_check_prints_the_side_by_side_table(capsys: object) -> None:
    assert main(["port", "check", "--pairs", "torch-flax", "--dtypes", "float32",
                 "--steps", "3"]) == 0
    text = capsys.readouterr().out  # type: ignore[attr-defined]
    rows = [line for line in text.splitlines() if line.startswith("| PyTorch → Flax")]
    assert len(rows) == 4  # momentum {0.1, 0.01} x eps {1e-5, 1e-3}
    cells = rows[0].split(" | ")
    assert float(cells[4].split(" / ")[0]) <= 1e-6  # eval, bnlab's conversion
    ours, naive, defaults = (float(v) for v in cells[5].split(" / "))  # running mean
    assert ours <= 1e-6 and naive > 1e3 * max(ours, 1e-9) and defaults > 1e3 * max(ours, 1e-9)
