"""The run specification: :class:`TrainConfig`, declared once, and its validation.

Each field carries its help text and the rule its value must satisfy in the dataclass
field metadata; the ``bnlab train`` flags are generated from these fields
(:mod:`bnlab.train._cli`), and a config travels between processes as JSON
(:meth:`TrainConfig.to_json` / :meth:`TrainConfig.from_json`).

:func:`validate_config` checks every value against its rule *before* anything is built,
allocated or downloaded: types, ranges, the model's and the norm's declared options, and
an estimate of the model's memory (from a build on PyTorch's ``meta`` device, which
allocates nothing). It serves the library, the CLI and checkpoint loading alike. Its
errors are :class:`ConfigError`, which names the field (``config.lr``), so a caller can
translate it (the CLI says ``--lr``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bnlab.errors import BnlabError

OPTIMIZERS = ("sgd", "adam")
DEVICES = ("cpu", "cuda")
MAX_THREADS = 1024
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts
MAX_COUNT = 10**12  # steps, subsets, batch sizes: far beyond any dataset here
# Integer model options that set how many modules are built: bounded so that even the
# memory estimate (one module object per block) stays cheap.
MODEL_OPTION_LIMITS: dict[str, int] = {"depth": 1000, "width": 2**20}


class ConfigError(BnlabError):
    """A bad config value. ``field`` is the TrainConfig field, ``option`` the key inside
    ``model_kwargs`` / ``norm_kwargs`` when the problem is one option there."""

    def __init__(self, field_name: str, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.field = field_name
        self.option = option


# --------------------------------------------------------------------------- value rules

Rule = Callable[[str, Any], None]
"""``rule(name, value)`` raises :class:`ConfigError` naming ``name`` when ``value`` is bad."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def whole(low: int, high: int, *, optional: bool = False) -> Rule:
    def rule(name: str, v: Any) -> None:
        if v is None and optional:
            return
        if not (_is_int(v) and low <= v <= high):
            what = ("a positive whole number" if low == 1 and high >= MAX_COUNT
                    else f"a whole number in [{low}, {high}]")
            raise ConfigError(name, f"{name} must be {what}"
                              f"{' or None' if optional else ''}, got {v!r}")
    return rule


def number(low: float, high: float = math.inf, *, low_open: bool = False,
           optional: bool = False) -> Rule:
    def rule(name: str, v: Any) -> None:
        if v is None and optional:
            return
        ok = _is_number(v) and (v > low if low_open else v >= low) and v <= high
        if not ok:
            what = ("a positive finite number" if low == 0 and low_open and high == math.inf
                    else f"a finite number >= {low:g}" if high == math.inf
                    else f"a number in ({low:g}, {high:g}]" if low_open
                    else f"a number in [{low:g}, {high:g}]")
            raise ConfigError(name, f"{name} must be {what}"
                              f"{' or None' if optional else ''}, got {v!r}")
    return rule


def choice(check: Callable[[str], None]) -> Rule:
    """A name checked by its registry (``check`` raises BnlabError listing the choices)."""
    def rule(name: str, v: Any) -> None:
        if not isinstance(v, str):
            raise ConfigError(name, f"{name} must be a name (a string), got {v!r}")
        try:
            check(v)
        except BnlabError as exc:
            raise ConfigError(name, str(exc)) from None
    return rule


def one_of(names: tuple[str, ...], what: str) -> Rule:
    def check(v: str) -> None:
        if v not in names:
            raise BnlabError(f"unknown {what} {v!r}; expected one of: {', '.join(names)}")
    return choice(check)


def flag_rule(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(name, f"{name} must be true or false, got {v!r}")


def options_rule(name: str, v: Any) -> None:
    """A dict of ``str -> JSON scalar`` (model/norm options); what each accepts is checked
    with the model and the norm in :func:`validate_config`."""
    if not isinstance(v, dict):
        raise ConfigError(name, f"{name} must be a dict of option=value, got "
                          f"{type(v).__name__} {v!r}")
    for key, value in v.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(name, f"{name}: option names must be identifiers, got {key!r}")
        if not (value is None or isinstance(value, bool | str) or _is_number(value)):
            raise ConfigError(name, f"{name}: option {key} must be a number, true/false, "
                              f"null or a string, got {value!r}", option=key)


def _model_name(v: str) -> None:
    from bnlab.models import check_model_name

    check_model_name(v)


def _norm_name(v: str) -> None:
    from bnlab.models.norms import norm_spec

    norm_spec(v)


def _placement(v: str) -> None:
    from bnlab.models.layers import check_placement

    check_placement(v)


def _dataset(v: str) -> None:
    from bnlab.data import check_dataset_name

    check_dataset_name(v)


def _opt(default: Any, help: str, rule: Rule, **cli: Any) -> Any:
    """A TrainConfig field: its default, help text, value rule and CLI hints (``flag``,
    ``metavar``, ``group``: flags in one group exclude each other, ``clears``: the field
    that a given value of this one sets to None)."""
    meta = {"help": help, "rule": rule, **cli}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Logged in full with every result.

    Exactly one of ``steps`` / ``epochs`` is set (``steps`` wins if both are given by a
    caller that means it; the CLI refuses both). ``model_kwargs`` go to the model builder
    (``depth``, ``width``, ``dropout`` …), ``norm_kwargs`` to every norm layer
    (``momentum``, ``virtual_batch_size`` …). Each field's help text and value rule are in
    its metadata (``dataclasses.fields(TrainConfig)``).
    """

    model: str = _opt("seed_cnn", "see 'bnlab models'", choice(_model_name))
    norm: str = _opt("bn", "none, bn, gn, ln, … (see 'bnlab models')", choice(_norm_name))
    placement: str = _opt("before", "norm 'before' or 'after' the activation",
                          choice(_placement))
    dataset: str = _opt("mnist", "mnist, fashion-mnist or digits", choice(_dataset))
    steps: int | None = _opt(500, "optimizer steps (default 500 unless --epochs)",
                             whole(1, MAX_COUNT, optional=True), group="length")
    epochs: float | None = _opt(None, "passes over the training set (an epoch drops the "
                                "last incomplete batch)",
                                number(0, 1e6, low_open=True, optional=True),
                                group="length", clears="steps")
    batch_size: int = _opt(64, "global batch size (split over --nproc workers)",
                           whole(1, MAX_COUNT))
    eval_batch_size: int = _opt(1000, "batch size for evaluation (no effect on results)",
                                whole(1, MAX_COUNT))
    optimizer: str = _opt("sgd", "sgd or adam", one_of(OPTIMIZERS, "optimizer"))
    lr: float = _opt(0.01, "learning rate", number(0, low_open=True))
    momentum: float = _opt(0.9, "SGD momentum", number(0))
    weight_decay: float = _opt(0.0, "L2 weight decay added to the gradient (torch.optim "
                               "convention)", number(0))
    decay_weights_only: bool = _opt(False, "apply weight_decay to conv/linear weights only, "
                                    "not to biases or norm scales/shifts", flag_rule)
    eval_every: int = _opt(100, "evaluate every K steps", whole(1, MAX_COUNT))
    seed: int = _opt(0, "seed for init, batch order and dropout (same seed + threads: same "
                     "run)", whole(*SEED_RANGE))
    threads: int | None = _opt(None, "torch.set_num_threads (default: torch's choice)",
                               whole(1, MAX_THREADS, optional=True))
    # _opt gives these a default_factory (a fresh dict per instance)
    model_kwargs: dict[str, Any] = _opt(  # noqa: RUF009
        {}, "model option, e.g. depth=16 width=64 dropout=0.5", options_rule,
        flag="--model-arg")
    norm_kwargs: dict[str, Any] = _opt(  # noqa: RUF009
        {}, "norm option, e.g. momentum=0.01", options_rule, flag="--norm-arg")
    init_scale: float = _opt(1.0, "multiply every conv/linear weight after the default "
                             "init", number(0, low_open=True))
    train_subset: int | None = _opt(None, "train on the first N training images",
                                    whole(1, MAX_COUNT, optional=True), metavar="N")
    eval_train: bool = _opt(False, "also report accuracy on the training split at each "
                            "evaluation", flag_rule)
    sync_bn: bool = _opt(False, "with --nproc > 1: synchronise BN statistics across "
                         "workers", flag_rule)
    eval_subset: int | None = _opt(None, "evaluate on the first N test images only",
                                   whole(1, MAX_COUNT, optional=True), metavar="N")
    dist_timeout_s: float = _opt(120.0, "process-group timeout: a failed worker ends the job "
                                 "within this", number(0, MAX_DIST_TIMEOUT_S, low_open=True),
                                 flag="--dist-timeout", metavar="S")
    device: str = _opt("cpu", "cpu or cuda", one_of(DEVICES, "device"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, raw: Any) -> TrainConfig:
        """A config from a dict such as :meth:`to_dict` returns; unknown fields are refused,
        values are not validated (call :func:`validate_config`). Whole numbers given for
        float fields become floats, so a JSON round trip gives an equal config."""
        if not isinstance(raw, dict):
            raise ConfigError("config", f"a config must be a JSON object, got {raw!r}")
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown config fields {unknown}")
        values = dict(raw)
        for name, value in values.items():
            if _FLOAT_FIELDS.get(name) and _is_int(value):
                values[name] = float(value)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError("config", f"config is not valid JSON ({exc})") from None
        return cls.from_dict(raw)


_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_FLOAT_FIELDS = {f.name: "float" in str(f.type) for f in dataclasses.fields(TrainConfig)}


def config_fields() -> list[dataclasses.Field[Any]]:
    """The fields of :class:`TrainConfig` in declaration order (what the CLI is made of)."""
    return list(_FIELDS.values())


# --------------------------------------------------------------------------- validation


def validate_config(config: TrainConfig, *, runnable: bool = True) -> None:
    """Raise :class:`ConfigError` naming the first bad value and what was expected.

    Checks each field's rule, then the model's options, the norm's options (against the
    option names the norm declares, and the values on one norm layer), the
    batch size a batch-statistics norm needs, and the memory of the model described (for
    the dataset's input). Builds no model. ``runnable=False`` (a checkpoint's config, to be
    evaluated here) skips the check that the config's device exists on this machine.
    """
    for f in _FIELDS.values():
        f.metadata["rule"](f.name, getattr(config, f.name))
    if config.steps is None and config.epochs is None:
        raise ConfigError("steps", "set steps or epochs (both are None)")
    if runnable and config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device", "device 'cuda' asked for, but torch sees no CUDA device")
    from bnlab.data import DATASET_INFO

    shape, classes = DATASET_INFO[config.dataset]
    check_model_options(config.model, config.model_kwargs)
    needs_batch = check_norm_options(config.norm, config.norm_kwargs)
    if needs_batch and config.batch_size < 2:
        raise ConfigError(
            "batch_size", f"batch_size {config.batch_size} with norm {config.norm!r}: batch "
            "statistics need at least 2 samples per batch; use batch_size >= 2, or a norm "
            "without batch statistics (gn, ln, frozen, none)")
    check_model_memory(config, shape, classes)


def _declared_default(field: str, owner: str, declared: dict[str, Any], key: str) -> Any:
    """The default of option ``key`` that ``owner`` declares; a ConfigError listing the
    declared options when it declares no such option."""
    if key not in declared:
        valid = ", ".join(f"{k}={v!r}" for k, v in declared.items()) or "none"
        raise ConfigError(field, f"{owner} does not take {key}; its options: {valid}",
                          option=key)
    return declared[key]


def check_model_options(model: str, options: dict[str, Any]) -> None:
    """Each option is one the model declares, of its default's type, within bounds."""
    from bnlab.models import model_kwargs_of

    declared = model_kwargs_of(model)
    for key, value in options.items():
        default = _declared_default("model_kwargs", f"model {model!r}", declared, key)
        try:
            if isinstance(default, bool):
                flag_rule(key, value)
            elif _is_int(default):
                whole(1, MODEL_OPTION_LIMITS.get(key, MAX_COUNT))(key, value)
            elif isinstance(default, float):
                number(0.0, 1.0 if key == "dropout" else math.inf)(key, value)
                if key == "dropout" and value >= 1:
                    raise ConfigError(key, f"dropout must be in [0, 1), got {value!r}")
        except ConfigError as exc:
            raise ConfigError("model_kwargs", f"model option {exc}", option=key) from None


_PROBE_CHANNELS = 64  # one norm layer this wide stands for the model's (a few KB)
_NOT_NORM_OPTIONS = {"self", "num_features", "num_channels", "num_groups", "dim", "device",
                     "dtype", "args", "kwargs"}


def norm_options_of(norm: str) -> dict[str, Any]:
    """The options norm ``norm`` declares, with defaults: its factory's own keyword
    arguments plus those of the module class it builds."""
    from bnlab.models.norms import make_norm, norm_spec

    spec = norm_spec(norm)
    declared: dict[str, Any] = {}
    for fn in (spec.factory, type(make_norm(norm, _PROBE_CHANNELS, 1)).__init__):
        for k, p in inspect.signature(fn).parameters.items():
            if k not in _NOT_NORM_OPTIONS and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                          p.KEYWORD_ONLY):
                declared.setdefault(k, None if p.default is p.empty else p.default)
    return declared


def check_norm_options(norm: str, options: dict[str, Any]) -> bool:
    """Check ``options`` against the norm's declared options; True when the norm needs
    more than one sample per batch in training mode (it uses batch statistics)."""
    import torch

    from bnlab.models.norms import make_norm

    declared = norm_options_of(norm)
    for key, value in options.items():
        default = _declared_default("norm_kwargs", f"norm {norm!r}", declared, key)
        try:
            if key == "momentum":
                number(0.0, 1.0, optional=True)(key, value)
            elif key == "eps":
                number(0.0, low_open=True)(key, value)
            elif isinstance(default, bool):
                flag_rule(key, value)
            elif _is_int(default):
                whole(1, MAX_COUNT)(key, value)
            elif isinstance(default, float):
                number(-math.inf)(key, value)
        except ConfigError as exc:
            raise ConfigError("norm_kwargs", f"norm option {exc}", option=key) from None
    try:
        layer = make_norm(norm, _PROBE_CHANNELS, 1, **options).train()
        with torch.no_grad():
            layer(torch.zeros(2, _PROBE_CHANNELS))
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("norm_kwargs", f"norm {norm!r} with options {options} cannot run: "
                          f"{first}") from None
    try:
        with torch.no_grad():
            layer(torch.zeros(1, _PROBE_CHANNELS))
    except (RuntimeError, ValueError):
        return True
    return False


def memory_limit_bytes() -> int:
    """The most memory a model's training state may need: this machine's physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB
        return 16 * 2**30


def check_model_memory(config: TrainConfig, in_shape: tuple[int, ...], num_classes: int,
                       limit: int | None = None) -> int:
    """Refuse a model whose training state (weights, gradients, optimizer state) would not
    fit in ``limit`` bytes (default: :func:`memory_limit_bytes`); returns the state bytes."""
    from bnlab.train.builder import state_shapes

    shapes = state_shapes(config, in_shape, num_classes)
    state = sum(math.prod(s) * dtype.itemsize for s, dtype in shapes.values())
    need = 4 * state  # weights, gradients, and two optimizer buffers (Adam) at most
    limit = memory_limit_bytes() if limit is None else limit
    if need > limit:
        opts = ", ".join(f"{k}={v}" for k, v in config.model_kwargs.items()) or "defaults"
        raise ConfigError(
            "model_kwargs", f"model {config.model!r} ({opts}) would need about "
            f"{need / 2**30:.1f} GiB to train ({state / 2**30:.1f} GiB of weights and "
            f"buffers); the limit is {limit / 2**30:.1f} GiB")
    return state
