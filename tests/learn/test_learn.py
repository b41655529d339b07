"""bnlab learn: reference solutions pass, each planted mistake fails with its own message."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.learn import EXERCISES, check_file, solution_path, template_path
from bnlab.learn import grading as G


@pytest.mark.parametrize("name", list(EXERCISES))
@pytest.mark.parametrize("seed", [0, 12345])
def test_reference_solution_passes(name: str, seed: int) -> None:
    grade = check_file(solution_path(name), seed=seed)
    assert grade.passed, grade.format()
    assert grade.max_diff < 1e-12


@pytest.mark.parametrize("name", list(EXERCISES))
def test_untouched_template_says_it_is_not_implemented(name: str) -> None:
    grade = check_file(template_path(name), seed=0)
    assert not grade.passed
    assert grade.problems[0].startswith("not implemented yet"), grade.problems


# (exercise, text in the reference solution, planted replacement, expected message) — the
# four teaching bugs first, then the other mistakes the grader names.
PLANTED = [
    ("forward", "x.var(axis=0)", "x.var(axis=0, ddof=1)", G.UNBIASED_NORMALISE),
    ("running", "np.ones(num_features)", "np.zeros(num_features)", G.RUNNING_VAR_ZERO),
    ("running", "(1 - momentum) * running_mean + momentum * mean",
     "momentum * running_mean + (1 - momentum) * mean", G.OPPOSITE_MOMENTUM),
    ("running", "(1 - momentum) * running_var + momentum * var_unbiased",
     "momentum * running_var + (1 - momentum) * var_unbiased", G.OPPOSITE_MOMENTUM),
    ("inference", "        else:\n            mean, var = self.running_mean, self.running_var\n",
     "        mean, var = x.mean(axis=0), x.var(axis=0)\n", G.BATCH_STATS_AT_INFERENCE),
    ("inference", "        self.training = False\n", "", G.TRAINING_NEVER_OFF),
    ("inference", "self.running_var = np.ones(dim)", "self.running_var = np.zeros(dim)",
     G.RUNNING_VAR_ZERO),
    ("inference", "(1 - m) * self.running_mean + m * mean",
     "m * self.running_mean + (1 - m) * mean", G.OPPOSITE_MOMENTUM),
    ("inference", "x.mean(axis=0), x.var(axis=0)\n", "x.mean(axis=0), x.var(axis=0, ddof=1)\n",
     G.UNBIASED_NORMALISE),
    ("running", "ddof=1", "ddof=0",
     "your running_var is the biased variance: PyTorch stores the unbiased one, n/(n−1) larger"),
    ("inference", "var * n / (n - 1)", "var",
     "your running_var is the biased variance: PyTorch stores the unbiased one"),
    ("forward", "np.sqrt(var + eps)", "(np.sqrt(var) + eps)", "eps is outside the square root"),
    ("forward", "np.sqrt(var + eps)", "np.sqrt(var)", "eps is missing"),
    ("forward", "mean = x.mean(axis=0)\n    var = x.var(axis=0)",
     "mean = x.mean(axis=1, keepdims=True)\n    var = x.var(axis=1, keepdims=True)",
     "like LayerNorm"),
    ("forward", "gamma * xhat + beta", "xhat", "gamma and beta are not applied"),
    ("backward", "    dx = dxc + dmean / n", "    dx = dxc", G._NO_MEAN_PATH),
    ("backward", "    dxc += 2.0 * xc * dvar / n", "    pass", G._NO_VAR_PATH),
    ("backward", "return dx, dgamma, dbeta", "return dx, dbeta, dgamma", "are swapped"),
    ("backward", "dgamma = (dout * xhat).sum(axis=0)", "dgamma = dout * xhat", "has shape (N, D)"),
    ("backward_alt", "dout - dout.mean(axis=0) - xhat * (dout * xhat).mean(axis=0)", "dout",
     G._CONSTANT_STATS),
    ("spatial", "axis=(0, 2, 3)", "axis=0", "every (channel, row, column) position separately"),
    ("spatial", "axis=(0, 2, 3)", "axis=(2, 3)", "InstanceNorm"),
    ("spatial", "x.var(axis=(0, 2, 3), keepdims=True)",
     "x.var(axis=(0, 2, 3), keepdims=True, ddof=1)", G.UNBIASED_NORMALISE),
]


def _plant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    source = solution_path(name).read_text(encoding="utf-8")
    assert old in source, f"{old!r} is not in the {name} solution"
    path = tmp_path / f"bn_{name}.py"
    path.write_text(source.replace(old, new), encoding="utf-8")
    return path


@pytest.mark.parametrize(("name", "old", "new", "message"), PLANTED,
                         ids=[f"{p[0]}-{i}" for i, p in enumerate(PLANTED)])
def test_planted_mistake_fails_with_its_message(
    tmp_path: Path, name: str, old: str, new: str, message: str
) -> None:
    path = _plant(tmp_path, name, old, new)
    grade = check_file(path, seed=7)
    assert not grade.passed
    assert any(message in p for p in grade.problems), grade.format()


def test_opposite_momentum_in_both_statistics_is_named_once(tmp_path: Path) -> None:
    source = solution_path("running").read_text(encoding="utf-8")
    for _, old, new, _ in PLANTED[2:4]:
        source = source.replace(old, new)
    path = tmp_path / "bn_running.py"
    path.write_text(source, encoding="utf-8")
    grade = check_file(path, seed=1)
    assert [G.OPPOSITE_MOMENTUM in p for p in grade.problems] == [True], grade.format()


def test_batch_statistics_at_inference_and_a_flag_never_switched_off_differ(
    tmp_path: Path,
) -> None:
    # The same wrong eval output; only the second also kept training (updated the stats).
    stats = check_file(_plant(tmp_path, *PLANTED[4][:3]), seed=2)
    flag = check_file(_plant(tmp_path, *PLANTED[5][:3]), seed=2)
    assert any(G.BATCH_STATS_AT_INFERENCE in p for p in stats.problems)
    assert not any(G.TRAINING_NEVER_OFF in p for p in stats.problems)
    assert any(G.TRAINING_NEVER_OFF in p for p in flag.problems)
    assert not any(G.BATCH_STATS_AT_INFERENCE in p for p in flag.problems)


@pytest.mark.parametrize(("source", "expected"), [
    ("# bnlab exercise: forward\ndef batchnorm_forward(x, gamma, beta, eps):\n    return (\n",
     "bn_forward.py, line 3"),
    ("# bnlab exercise: forward\ndef other():\n    pass\n", "defines no batchnorm_forward"),
    ("# bnlab exercise: forward\ndef batchnorm_forward(x, gamma, beta, eps):\n"
     "    return x / undefined_name\n", "NameError: name 'undefined_name' is not defined"),
    ("# bnlab exercise: forward\ndef batchnorm_forward(x, gamma, beta, eps):\n"
     "    return 'text'\n", "returned str"),
    ("# bnlab exercise: running\ndef init_running_stats(d):\n    return 0\n"
     "def update_running_stats(m, v, x, momentum):\n    return m, v\n", "must return a tuple"),
    ("# bnlab exercise: forward\nimport sys\nsys.exit(0)\n", "ended the grading process"),
    ("# bnlab exercise: forward\nraise RuntimeError('at import')\n", "raised while loading"),
])
def test_broken_files_get_a_clear_message(tmp_path: Path, source: str, expected: str) -> None:
    path = tmp_path / "bn_forward.py"
    path.write_text(source, encoding="utf-8")
    grade = check_file(path, seed=0)
    assert not grade.passed
    assert expected in grade.problems[0], grade.problems


def test_an_endless_loop_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "bn_forward.py"
    path.write_text("# bnlab exercise: forward\ndef batchnorm_forward(x, g, b, eps):\n"
                    "    while True:\n        pass\n", encoding="utf-8")
    grade = check_file(path, seed=0, timeout=1.0)
    assert not grade.passed
    assert "did not finish within 1 s" in grade.problems[0]
    assert grade.seconds < 5


def test_the_learner_code_runs_in_another_process(tmp_path: Path) -> None:
    # A file that tries to make the grader lenient changes only its own process.
    path = tmp_path / "bn_forward.py"
    path.write_text("# bnlab exercise: forward\nimport bnlab.learn.grading as g\ng.TOL = 1e9\n"
                    "def batchnorm_forward(x, gamma, beta, eps):\n    return x\n",
                    encoding="utf-8")
    grade = check_file(path, seed=0)
    assert not grade.passed and G.TOL == 1e-7


def test_cli_list_start_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["learn", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXERCISES)
    target = tmp_path / "mine.py"
    assert main(["learn", "start", "forward", "--out", str(target)]) == 0
    assert target.read_text() == template_path("forward").read_text()
    assert main(["learn", "start", "forward", "--out", str(target)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert main(["learn", "check", str(target), "--seed", "0"]) == 1
    assert "not implemented yet" in capsys.readouterr().out
    target.write_text(solution_path("forward").read_text())
    assert main(["learn", "check", str(target)]) == 0
    assert capsys.readouterr().out.startswith("PASS forward")


def test_cli_bad_path_or_exercise_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["learn", "check", str(tmp_path / "missing.py")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and len(err.strip().splitlines()) == 1
    plain = tmp_path / "plain.py"
    plain.write_text("x = 1\n")
    assert main(["learn", "check", str(plain)]) == 2
    assert "# bnlab exercise: NAME" in capsys.readouterr().err
    assert main(["learn", "start", "nope"]) == 2
    assert "unknown exercise 'nope'" in capsys.readouterr().err
