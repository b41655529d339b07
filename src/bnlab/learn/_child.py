"""Runs a learner's exercise file in its own process and records what its functions return.

Started by :mod:`bnlab.learn.grading` as ``python -I _child.py EXERCISE FILE INPUTS OUTPUTS
RESULT`` with a timeout, in a temporary working directory. It needs NumPy only and imports
nothing from bnlab, so the learner's code never shares a process with the grader: it reads
the cases from INPUTS (an ``.npz``), calls the learner's functions, writes what they returned
to OUTPUTS (an ``.npz``, read back without pickle) and a JSON verdict on the run itself
(did the file load, were the names there, did a call raise) to RESULT.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The names each exercise's file must define (functions, or the class for "inference").
REQUIRED: dict[str, tuple[str, ...]] = {
    "forward": ("batchnorm_forward",),
    "running": ("init_running_stats", "update_running_stats"),
    "inference": ("BatchNorm1d",),
    "backward": ("batchnorm_backward",),
    "backward_alt": ("batchnorm_backward_alt",),
    "spatial": ("spatial_batchnorm_forward",),
}


class LearnerError(Exception):
    """What the learner's code did wrong, as one message for the grader to show."""


def _array(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise LearnerError(
            f"{what} returned {type(value).__name__}, expected a NumPy array of numbers"
        ) from None
    return arr


def _pair(value: Any, what: str, names: str) -> tuple[np.ndarray, ...]:
    count = len(names.split(","))
    if not isinstance(value, (tuple, list)) or len(value) != count:
        got = type(value).__name__
        if isinstance(value, (tuple, list)):
            got += f" of length {len(value)}"
        raise LearnerError(f"{what} must return a tuple ({names}), got {got}")
    parts = zip(value, names.split(","), strict=True)
    return tuple(_array(v, f"{what} ({n.strip()})") for v, n in parts)


def _cases(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    count = int(inputs["count"])
    return [
        {k.split("_", 1)[1]: v for k, v in inputs.items() if k.startswith(f"c{i}_")}
        for i in range(count)
    ]


def _drive_forward(mod: Any, case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = mod.batchnorm_forward(case["x"].copy(), case["gamma"].copy(), case["beta"].copy(),
                                float(case["eps"]))
    return {"out": _array(out, "batchnorm_forward")}


def _drive_spatial(mod: Any, case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = mod.spatial_batchnorm_forward(case["x"].copy(), case["gamma"].copy(),
                                        case["beta"].copy(), float(case["eps"]))
    return {"out": _array(out, "spatial_batchnorm_forward")}


def _drive_running(mod: Any, case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    init = _pair(mod.init_running_stats(int(case["x"].shape[1])), "init_running_stats",
                 "running_mean, running_var")
    new = _pair(
        mod.update_running_stats(case["running_mean"].copy(), case["running_var"].copy(),
                                 case["x"].copy(), float(case["momentum"])),
        "update_running_stats", "new_running_mean, new_running_var",
    )
    return {"init_mean": init[0], "init_var": init[1], "new_mean": new[0], "new_var": new[1]}


def _backward(name: str) -> Callable[[Any, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def drive(mod: Any, case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fn = getattr(mod, name)
        grads = _pair(fn(case["dout"].copy(), case["x"].copy(), case["gamma"].copy(),
                         float(case["eps"])), name, "dx, dgamma, dbeta")
        return {"dx": grads[0], "dgamma": grads[1], "dbeta": grads[2]}

    return drive


def _stats(bn: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    for attr in ("running_mean", "running_var"):
        if not hasattr(bn, attr):
            raise LearnerError(f"BatchNorm1d has no attribute {attr!r} ({what})")
    return (_array(bn.running_mean, f"BatchNorm1d.running_mean ({what})"),
            _array(bn.running_var, f"BatchNorm1d.running_var ({what})"))


def _drive_inference(mod: Any, case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    dim = int(case["gamma"].shape[0])
    bn = mod.BatchNorm1d(dim, eps=float(case["eps"]), momentum=float(case["momentum"]))
    out: dict[str, np.ndarray] = {}
    out["init_mean"], out["init_var"] = _stats(bn, "after __init__")
    out["training_init"] = np.array(bool(getattr(bn, "training", False)))
    bn.gamma, bn.beta = case["gamma"].copy(), case["beta"].copy()
    steps = int(case["steps"])
    for t in range(steps):
        out[f"y{t}"] = _array(bn(case[f"x{t}"].copy()), "BatchNorm1d.__call__ (training)")
        out[f"mean{t}"], out[f"var{t}"] = _stats(bn, f"after training step {t + 1}")
    if not callable(getattr(bn, "eval", None)):
        raise LearnerError("BatchNorm1d has no eval() method: it must switch training off")
    bn.eval()
    out["training_eval"] = np.array(bool(getattr(bn, "training", False)))
    out["y_eval"] = _array(bn(case["x_eval"].copy()), "BatchNorm1d.__call__ (eval)")
    out["mean_eval"], out["var_eval"] = _stats(bn, "after the eval call")
    return out


DRIVERS: dict[str, Callable[[Any, dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "forward": _drive_forward,
    "running": _drive_running,
    "inference": _drive_inference,
    "backward": _backward("batchnorm_backward"),
    "backward_alt": _backward("batchnorm_backward_alt"),
    "spatial": _drive_spatial,
}


def _learner_frames(exc: BaseException, path: str) -> str:
    """The traceback lines that point into the learner's file (the rest is ours)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    where = "".join(f"  line {f.lineno}, in {f.name}: {f.line}\n" for f in frames[-3:])
    return f"{type(exc).__name__}: {exc}\n{where}".rstrip()


def run(exercise: str, path: str, inputs_path: str, outputs_path: str) -> dict[str, Any]:
    source = Path(path).read_text(encoding="utf-8")
    try:
        code = compile(source, path, "exec")
    except SyntaxError as exc:
        return {"ok": False, "kind": "syntax",
                "message": f"{Path(path).name}, line {exc.lineno}: {exc.msg}"}
    sys.path.insert(0, str(Path(path).resolve().parent))
    spec = importlib.util.spec_from_file_location("learner", path)
    if spec is None:
        return {"ok": False, "kind": "load", "message": f"cannot load {path} as Python"}
    mod = importlib.util.module_from_spec(spec)
    try:
        exec(code, mod.__dict__)
    except Exception as exc:
        return {"ok": False, "kind": "raised",
                "message": "the file raised while loading: " + _learner_frames(exc, path)}
    missing = [name for name in REQUIRED[exercise] if not callable(getattr(mod, name, None))]
    if missing:
        return {"ok": False, "kind": "missing",
                "message": f"{Path(path).name} defines no {', '.join(missing)} "
                           f"(the {exercise} exercise needs {', '.join(REQUIRED[exercise])})"}
    with np.load(inputs_path, allow_pickle=False) as data:
        cases = _cases(dict(data))
    outputs: dict[str, np.ndarray] = {}
    for i, case in enumerate(cases):
        try:
            result = DRIVERS[exercise](mod, case)
        except NotImplementedError as exc:
            return {"ok": False, "kind": "todo",
                    "message": f"not implemented yet ({exc or 'NotImplementedError'}): "
                               "replace the `raise NotImplementedError` with your code"}
        except LearnerError as exc:
            return {"ok": False, "kind": "bad_return", "message": str(exc), "case": i}
        except Exception as exc:
            return {"ok": False, "kind": "raised", "case": i,
                    "message": "your code raised " + _learner_frames(exc, path)}
        outputs.update({f"c{i}_{k}": v for k, v in result.items()})
    np.savez(outputs_path, **outputs)  # type: ignore[arg-type]
    return {"ok": True}


def main(argv: list[str]) -> int:
    exercise, path, inputs_path, outputs_path, result_path = argv
    result = run(exercise, path, inputs_path, outputs_path)
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
