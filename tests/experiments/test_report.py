"""The lab's report across profiles and datasets: cells side by side, contradictions,
transfer, verdicts.json, the README's generated block, and the committed results.

The synthetic labs are folders of ``NAME/result.json`` files written here (what
``runner.write_results`` writes); the committed ones are ``docs/results/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bnlab.cli import main
from bnlab.errors import BnlabError
from bnlab.experiments import experiment_names, get_experiment
from bnlab.experiments.report import write_labs_report, write_report
from bnlab.experiments.summary import (
    README_BEGIN,
    README_END,
    committed_labs,
    entries,
    listing,
    load_lab,
    readme_block,
    readme_results,
    replace_block,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00"
       b"\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05"
       b"\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")
# two registered names: one a seed claim, one a literature experiment when registered
CLAIM, OTHER = "convergence", "depth"


def result(name: str, profile: str, dataset: str, verdict: str, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": name, "claim": f"claim of {name}", "seeds": "000, 001",
        "quote": f"the seeds' words on {name}", "section": "claim", "papers": "",
        "literature": "", "practice": {"supported": f"use BN for {name}",
                                       "not supported": f"BN does not help {name}",
                                       "inconclusive": f"unknown for {name}"},
        "protocol": f"protocol {profile}", "rule": f"rule of {name}", "verdict": verdict,
        "headline": f"{name} {profile}/{dataset}: +1.00 (95 % CI +0.50 to +1.50, 5 seeds)",
        "effect": {"diff": 1.0, "low": 0.5, "steps": float("inf")},
        "table": [{"norm": "bn", "acc": "97.0 ± 0.1 %"}], "notes": [], "profile": profile,
        "dataset": dataset, "bnlab_version": "0.1.0", "runs": [{"id": "a"}],
        "run_time_s": 10.0, "elapsed_s": 30.0, "csv": f"{name}.csv", "plots": ["p.png"],
    }
    r.update(kw)
    return r


def write_lab(folder: Path, results: list[dict[str, Any]]) -> Path:
    for r in results:
        d = folder / r["name"]
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))
        (d / f"{r['name']}.csv").write_text("norm,acc\nbn,0.97\n")
        (d / "p.png").write_bytes(PNG)
    first = results[0]
    (folder / "lab.json").write_text(json.dumps({"profile": first["profile"],
                                                 "dataset": first["dataset"]}))
    return folder


def three_labs(tmp_path: Path, quick: str = "inconclusive", full_fashion: str = "supported"
               ) -> list[Path]:
    return [
        write_lab(tmp_path / "lab-quick", [result(CLAIM, "quick", "mnist", quick),
                                           result(OTHER, "quick", "mnist", "not supported")]),
        write_lab(tmp_path / "lab-full-mnist", [result(CLAIM, "full", "mnist", "supported"),
                                                result(OTHER, "full", "mnist", "not supported")]),
        write_lab(tmp_path / "lab-full-fashion",
                  [result(CLAIM, "full", "fashion-mnist", full_fashion),
                   result(OTHER, "full", "fashion-mnist", "not supported")]),
    ]


# --------------------------------------------------------------------------- logic


def test_contradiction_is_supported_against_not_supported_on_one_dataset(
        tmp_path: Path) -> None:
    ok = entries([load_lab(p) for p in three_labs(tmp_path / "a", quick="inconclusive")])
    assert [e.contradictions() for e in ok] == [[], []]
    bad = entries([load_lab(p) for p in three_labs(tmp_path / "b", quick="not supported")])
    claim = next(e for e in bad if e.name == CLAIM)
    assert claim.contradictions() == ["mnist"]
    assert claim.contradiction_lines() == [
        f"contradiction: {CLAIM} on mnist: quick not supported, full supported"]
    # the same two verdicts on two different datasets contradict nothing
    cross = entries([load_lab(p) for p in three_labs(tmp_path / "c", quick="supported",
                                                         full_fashion="not supported")])
    assert next(e for e in cross if e.name == CLAIM).contradictions() == []


def test_transfer_needs_full_on_two_datasets(tmp_path: Path) -> None:
    same = entries([load_lab(p) for p in three_labs(tmp_path / "a")])
    assert {e.name: e.transfers() for e in same} == {CLAIM: "yes", OTHER: "yes"}
    differ = entries([load_lab(p) for p in three_labs(tmp_path / "b",
                                                          full_fashion="inconclusive")])
    assert {e.name: e.transfers() for e in differ} == {CLAIM: "no", OTHER: "yes"}
    quick_only = entries([load_lab(three_labs(tmp_path / "c")[0])])
    assert [e.transfers() for e in quick_only] == ["n/a", "n/a"]


def test_practice_speaks_for_full_mnist_else_what_exists(tmp_path: Path) -> None:
    labs = [load_lab(p) for p in three_labs(tmp_path, quick="inconclusive",
                                            full_fashion="inconclusive")]
    [claim, _] = entries(labs)
    assert claim.practice_cell() == "full/mnist"
    assert claim.practice_sentence() == f"use BN for {CLAIM}"
    [quick_claim, _] = entries(labs[:1])
    assert quick_claim.practice_cell() == "quick/mnist"
    assert quick_claim.practice_sentence() == f"unknown for {CLAIM}"
    [fashion, _] = entries(labs[2:])
    assert fashion.practice_cell() == "full/fashion-mnist"


def test_old_results_take_the_declaration_from_the_experiment(tmp_path: Path) -> None:
    old = result(CLAIM, "quick", "mnist", "supported")
    for f in ("quote", "section", "papers", "literature", "practice"):
        del old[f]
    [e] = entries([load_lab(write_lab(tmp_path / "old", [old]))])
    exp = get_experiment(CLAIM)
    assert (e.quote, e.section, e.papers, e.literature, e.practice) == (
        exp.quote, exp.section, exp.papers, exp.literature, dict(exp.practice))


def test_a_folder_mixing_datasets_and_two_folders_of_one_cell_are_refused(
        tmp_path: Path) -> None:
    mixed = write_lab(tmp_path / "mixed", [result(CLAIM, "quick", "mnist", "supported"),
                                           result(OTHER, "quick", "fashion-mnist", "supported")])
    with pytest.raises(BnlabError, match="mixes results of several profiles or datasets"):
        load_lab(mixed)
    a = write_lab(tmp_path / "a", [result(CLAIM, "quick", "mnist", "supported")])
    b = write_lab(tmp_path / "b", [result(CLAIM, "quick", "mnist", "supported")])
    with pytest.raises(BnlabError, match="two lab folders hold quick/mnist"):
        write_labs_report([a, b], tmp_path / "out")
    with pytest.raises(BnlabError, match="2 lab folders need --out"):
        write_labs_report([a, write_lab(tmp_path / "c", [result(CLAIM, "full", "mnist",
                                                                 "supported")])])


def test_list_groups_seed_claims_then_literature() -> None:
    lines = listing()
    names = experiment_names()
    sections = {n: get_experiment(n).section for n in names}
    assert lines[0] == "Seed claims:"
    claims = [n for n in names if sections[n] == "claim"]
    literature = [n for n in names if sections[n] == "literature"]
    body = [line.split()[0] for line in lines if line.startswith("  ")]
    assert body == claims + literature  # each once, in the registry's order within a group
    if literature:
        assert lines[len(claims) + 1] == "Literature:"
    for line in lines[1:]:
        if line.startswith("  "):
            exp = get_experiment(line.split()[0])
            assert exp.claim in line
            assert (exp.papers if exp.section == "literature" else exp.seeds) in line


# --------------------------------------------------------------------------- the report


def test_multi_folder_report_shows_every_cell_and_copies_by_cell(tmp_path: Path) -> None:
    written = write_labs_report(three_labs(tmp_path), tmp_path / "docs")
    out = tmp_path / "docs"
    for slug in ("quick-mnist", "full-mnist", "full-fashion-mnist"):
        assert (out / slug / CLAIM / "result.json").is_file()
        assert (out / slug / CLAIM / "p.png").read_bytes() == PNG
        assert (out / slug / CLAIM / f"{CLAIM}.csv").is_file()
    md = written.markdown.read_text()
    assert ("| claim | experiment | quick/mnist | full/mnist | full/fashion-mnist | "
            "transfers |") in md
    assert (f"| claim of {CLAIM} | [`{CLAIM}`](#{CLAIM}) | **inconclusive** | **supported** | "
            f"**supported** | yes | seeds 000, 001 |") in md
    assert f"> the seeds' words on {CLAIM}" in md
    assert f"| `full/fashion-mnist` | **supported** | {CLAIM} full/fashion-mnist: +1.00" in md
    assert f"**In practice** (`full/mnist`: supported): use BN for {CLAIM}" in md
    assert f"![{CLAIM}: p.png](full-fashion-mnist/{CLAIM}/p.png)" in md
    assert "protocol quick" in md and "protocol full" in md
    assert "## Contradictions between profiles\n\nNone:" in md
    page = written.html.read_text()
    assert page.count("src='data:image/png;base64,") == 6
    assert "http://" not in page and "https://" not in page
    assert f"<section id='{CLAIM}'>" in page and "class='toc'" in page
    # every relative link of the markdown resolves
    for link in re.findall(r"\]\(([^)#]+)\)", md):
        assert (out / link).is_file(), link
    data = json.loads(written.verdicts.read_text())
    assert data[CLAIM]["cells"]["full/fashion-mnist"]["verdict"] == "supported"
    assert data[CLAIM]["cells"]["quick/mnist"]["effect"]["steps"] == "inf"
    assert data[CLAIM]["contradiction"] is False and data[CLAIM]["transfers"] == "yes"
    assert data[CLAIM]["seeds"] == "000, 001" and data[CLAIM]["section"] == "claim"


def test_literature_beside_the_lab(tmp_path: Path) -> None:
    lit = result(OTHER, "full", "mnist", "supported", section="literature",
                 papers="Someone et al., 2018", literature="VGG on CIFAR-10: 2x smoother")
    written = write_labs_report([write_lab(tmp_path / "lab", [
        result(CLAIM, "full", "mnist", "supported"), lit])], tmp_path / "out")
    md = written.markdown.read_text()
    assert "### Seed claims" in md and "### Literature" in md
    assert md.index("### Seed claims") < md.index("### Literature")
    side_by_side = ("| the literature (Someone et al., 2018) | this lab |\n|---|---|\n"
                    f"| VGG on CIFAR-10: 2x smoother | `full/mnist` **supported**: {OTHER}")
    assert side_by_side in md
    page = written.html.read_text()
    assert "<h4>The literature</h4>" in page and "VGG on CIFAR-10: 2x smoother" in page
    # an experiment with empty declarations reads without empty blocks
    bare = result(CLAIM, "quick", "mnist", "supported", quote="", literature="", practice={})
    md2 = write_labs_report([write_lab(tmp_path / "bare", [bare])]).markdown.read_text()
    assert "> " not in md2 and "the literature" not in md2 and "In practice" not in md2


def test_cli_prints_contradictions_and_check_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = [str(p) for p in three_labs(tmp_path / "bad", quick="not supported")]
    out = tmp_path / "out"
    assert main(["report", *dirs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:] == [f"contradiction: {CLAIM} on mnist: quick not supported, full supported"]
    assert main(["report", *dirs, "--out", str(out), "--check"]) == 1
    assert capsys.readouterr().out.splitlines()[1:] == printed[1:]
    md = (out / "report.md").read_text()
    assert f"- contradiction: {CLAIM} on mnist" in md
    assert json.loads((out / "verdicts.json").read_text())[CLAIM]["contradiction"] is True
    good = [str(p) for p in three_labs(tmp_path / "good")]
    assert main(["report", *good, "--out", str(tmp_path / "out2"), "--check"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_one_folder_without_out_reports_in_place(tmp_path: Path) -> None:
    lab = three_labs(tmp_path)[0]
    md, page = write_report(lab)
    assert md == lab / "report.md" and page.is_file()
    assert f"![{CLAIM}: p.png]({CLAIM}/p.png)" in md.read_text()
    assert (lab / "verdicts.json").is_file()


def test_readme_block_is_replaced_and_missing_markers_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = three_labs(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_BEGIN}\nold text\n{README_END}\nafter\n")
    out = tmp_path / "docs" / "results"
    written = write_labs_report(list(dirs), out, readme)
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old text" not in text
    block = readme_results(text)
    assert block == readme_block(written.labs, "docs/results/report.md")
    assert "| `full/fashion-mnist` | 2 | 1.0 min | 0.1.0 |" in block
    assert (f"- **{CLAIM}**: `quick/mnist` **inconclusive**, `full/mnist` **supported**, "
            f"`full/fashion-mnist` **supported**. *full/mnist:* {CLAIM} full/mnist") in block
    assert block == readme_block(committed_labs(out), "docs/results/report.md")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert main(["report", *map(str, dirs), "--out", str(tmp_path / "o"),
                 "--readme", str(plain)]) == 2
    assert "has no '<!-- results:begin -->'" in capsys.readouterr().err
    assert plain.read_text() == "no markers\n" and not (tmp_path / "o").exists()
    with pytest.raises(BnlabError, match="has no"):
        replace_block("x", "y")


# --------------------------------------------------------------------------- committed results


def test_committed_results_do_not_contradict_across_profiles() -> None:
    labs = committed_labs(RESULTS)
    assert labs, "docs/results holds no lab results"
    found = [line for e in entries(labs) for line in e.contradiction_lines()]
    assert found == [], "\n".join(found)
    for lab in labs:  # each committed lab sits in its own profile-dataset folder
        assert lab.root.name in (lab.slug, RESULTS.name)


def test_readme_block_is_generated_from_the_committed_results() -> None:
    block = readme_results((ROOT / "README.md").read_text(encoding="utf-8"))
    assert block is not None, f"README.md has no {README_BEGIN} … {README_END} block"
    expected = readme_block(committed_labs(RESULTS), "docs/results/report.md")
    assert block == expected, (
        "README.md's results block is not what the committed docs/results/ give; "
        "regenerate it with `bnlab report ... --out docs/results --readme README.md`")


def test_a_reports_out_folder_reads_back_as_its_labs(tmp_path: Path) -> None:
    out = tmp_path / "docs"
    first = write_labs_report(three_labs(tmp_path), out)
    again = write_labs_report([out], out)  # regenerated from the copies, in place
    assert [lab.key for lab in again.labs] == ["quick/mnist", "full/mnist",
                                               "full/fashion-mnist"]
    assert again.markdown.read_text() == first.markdown.read_text()


def test_a_contradiction_is_flagged_in_the_summary_and_the_section(tmp_path: Path) -> None:
    written = write_labs_report(three_labs(tmp_path, quick="not supported"), tmp_path / "o")
    md = written.markdown.read_text()
    assert f"[`{CLAIM}`](#{CLAIM}) (contradiction) |" in md
    assert (f"**Contradiction between profiles:** {CLAIM} on mnist: quick not supported, full "
            "supported.") in md
    assert f"[`{OTHER}`](#{OTHER}) |" in md
    assert "<b>Contradiction between profiles:</b>" in written.html.read_text()
