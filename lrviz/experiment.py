"""Loading a user's experiment script and calling it safely.

A script is a plain Python file with ``build_model()``, ``build_data()``, and
``loss_fn(output, target)`` or ``compute_loss(model, batch)``; optionally
``build_optimizer(params, lr)``, ``DEFAULTS`` and ``PARAMS`` (knobs shown in the app).
Every failure becomes one :class:`ScriptError` naming the file, the line and the cause.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import linecache
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .errors import ScriptError
from .examples import (  # noqa: F401  (their home before the app had to find them without torch)
    DEFAULT_EXAMPLE,
    PLAIN_SCRIPT_MARK,
    default_experiment_path,
    example_paths,
    examples_dir,
    is_plain_script,
    resolve_script,
)

DEFAULT_KEYS = (
    "lr", "optimizer", "momentum", "weight_decay", "epochs", "steps",
    "schedule", "batch_size", "seed", "eval_every", "nesterov", "pace", "checkpoint_every",
    "early_stopping", "amp", "accumulate", "clip_grad_norm",
)


def error_from_exception(exc: BaseException, path: str | Path, what: str) -> ScriptError:
    """A ScriptError for an exception raised while running ``what`` from the script at ``path``.

    Points at the innermost line of the script in the traceback (or of the syntax error).
    """
    if isinstance(exc, ScriptError):
        return exc
    path = str(path)
    if isinstance(exc, SyntaxError) and exc.filename == path:
        err = ScriptError(f"syntax error: {exc.msg}", path, exc.lineno)
        err.__cause__ = exc
        return err
    line = _script_line(exc, path)
    msg = str(exc) or type(exc).__name__
    err = ScriptError(f"{what} raised {type(exc).__name__}: {msg}", path, line)
    err.__cause__ = exc
    return err


def _script_line(exc: BaseException, path: str) -> int | None:
    """The innermost line of the script at ``path`` in the exception's traceback."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == path:
            line = frame.lineno
    return line


def _assignment_line(path: str, name: str) -> int | None:
    """The line where the script defines or assigns ``name`` at module level (for non-functions)."""
    import ast

    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node.lineno
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node.lineno
    return None


def _accepted_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in sig.parameters}


def _is_one_shot(obj: Any) -> bool:
    """An iterator (a generator, ``iter(list)``, ``map``...): empty once consumed."""
    return isinstance(obj, Iterator)


def _is_iterable(obj: Any) -> bool:
    """What ``iter(obj)`` would accept, decided from the type alone.

    Calling ``iter()`` to find out would start an epoch: a DataLoader then draws its workers' seed
    from its generator (or the global RNG), and training would see another data order than the
    script's own loop.
    """
    cls = type(obj)
    if hasattr(cls, "__iter__"):
        return cls.__iter__ is not None  # type: ignore[attr-defined]
    return hasattr(cls, "__getitem__")  # the sequence protocol


def _check_iterable(obj: Any, path: str, line: int | None, which: str) -> None:
    if not _is_iterable(obj):
        raise ScriptError(
            f"build_data returned {which} of type {type(obj).__name__}, which cannot be iterated; "
            "return a DataLoader or a list of batches (or a (train, val) tuple of them)",
            path, line,
        )
    if _is_one_shot(obj):
        raise ScriptError(
            f"build_data returned {which} as a one-shot iterator ({type(obj).__name__}): it would be empty "
            "from the second epoch on; return a list or a DataLoader, which can be iterated every epoch",
            path, line,
        )


@dataclass
class Experiment:
    """A loaded experiment script: its functions, defaults, knobs and description."""

    path: Path
    module: ModuleType
    source_hash: str
    defaults: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    doc: str = ""

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def has_custom_optimizer(self) -> bool:
        return callable(getattr(self.module, "build_optimizer", None))

    @property
    def accepts_batch_size(self) -> bool:
        return "batch_size" in _accepted_kwargs(self.module.build_data, {"batch_size": 1})

    def line_of(self, name: str) -> int | None:
        """The line of the script where ``name`` is defined (a function, or an assignment)."""
        obj = getattr(self.module, name, None)
        try:
            return inspect.getsourcelines(obj)[1]
        except (TypeError, OSError):
            return _assignment_line(str(self.path), name)

    _line_of = line_of

    @property
    def loss_name(self) -> str:
        """``compute_loss`` or ``loss_fn``: which one the script uses."""
        return "compute_loss" if callable(getattr(self.module, "compute_loss", None)) else "loss_fn"

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.module, name)
        try:
            return fn(*args, **_accepted_kwargs(fn, kwargs))
        except Exception as exc:  # the user's code: anything can happen
            raise error_from_exception(exc, self.path, f"{name}()") from exc

    def make_model(self, params: dict[str, Any] | None = None) -> torch.nn.Module:
        """Call ``build_model`` (with the script's knobs it accepts) and check the result."""
        model = self._call("build_model", **self._knobs(params))
        if not isinstance(model, torch.nn.Module):
            raise ScriptError(
                f"build_model() returned {type(model).__name__}; it must return a torch.nn.Module",
                str(self.path), self._line_of("build_model"),
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise ScriptError(
                "build_model() returned a model with no trainable parameters",
                str(self.path), self._line_of("build_model"),
            )
        return model

    def make_data(
        self, batch_size: int | None = None, params: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ) -> tuple[Iterable[Any], Iterable[Any] | None]:
        """Call ``build_data`` and return ``(train, val)``; ``val`` is None when not given.

        ``extra``: more arguments for a ``build_data`` that takes them (a distributed run's ``rank``
        and ``world_size``)."""
        kw = self._knobs(params)
        if batch_size is not None:
            kw["batch_size"] = batch_size
        kw.update(extra or {})
        out = self._call("build_data", **kw)
        line = self._line_of("build_data")
        path = str(self.path)
        if isinstance(out, (dict, str, bytes)):
            raise ScriptError(
                f"build_data() returned a {type(out).__name__}; return train or (train, val): iterables of "
                "batches such as DataLoaders or lists", path, line)
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ScriptError(
                    f"build_data() returned a tuple of {len(out)} items; return train or (train, val)", path, line
                )
            train, val = out
        else:
            train, val = out, None
        if train is None:
            raise ScriptError("build_data() returned None; return train or (train, val)", path, line)
        _check_iterable(train, path, line, "the training data")
        if val is not None:
            _check_iterable(val, path, line, "the validation data")
        return train, val

    def make_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer | None:
        """The script's own optimizer when it defines ``build_optimizer``, else None."""
        if not self.has_custom_optimizer:
            return None
        opt = self._call("build_optimizer", model.parameters(), lr)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ScriptError(
                f"build_optimizer() returned {type(opt).__name__}; it must return a torch.optim.Optimizer",
                str(self.path), self._line_of("build_optimizer"),
            )
        return opt

    def loss_function(self) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
        """``(model, batch) -> loss``: the script's ``compute_loss``, or ``loss_fn(model(x), y)``."""
        compute = getattr(self.module, "compute_loss", None)
        if callable(compute):
            return compute
        loss_fn = self.module.loss_fn

        def loss_of_pair(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            inputs, targets = batch
            try:
                output = model(inputs)
            except Exception as exc:
                exc._lrviz_stage = "model"  # type: ignore[attr-defined]
                raise
            return loss_fn(output, targets)

        return loss_of_pair

    def describe_batch_error(self, exc: BaseException, batch: Any, during: str) -> ScriptError:
        """A ScriptError for a step that failed, with a hint when the batch shape is the likely cause."""
        uses_pairs = not callable(getattr(self.module, "compute_loss", None))
        if uses_pairs and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            kind = type(batch).__name__
            n = f" of {len(batch)} items" if isinstance(batch, (tuple, list, dict)) else ""
            return ScriptError(
                f"{during}: a batch is a {kind}{n}, but without compute_loss() batches must be "
                "(inputs, targets) pairs; define compute_loss(model, batch) for other batch shapes",
                str(self.path), self._line_of("build_data"),
            )
        err = error_from_exception(exc, self.path, during)
        if err.line is None:  # raised inside torch: point at the part of the script that was running
            if getattr(exc, "_lrviz_stage", None) == "model":
                err = ScriptError(f"{during}: the model (build_model) failed on a batch from build_data: "
                                  f"{type(exc).__name__}: {exc}", str(self.path), self.line_of("build_model"))
            else:
                name = self.loss_name
                err = ScriptError(f"{during}: {name} raised {type(exc).__name__}: {exc}", str(self.path),
                                  self.line_of(name))
            err.__cause__ = exc
        return err

    def _knobs(self, params: dict[str, Any] | None) -> dict[str, Any]:
        merged = dict(self.params)
        if params:
            unknown = sorted(set(params) - set(self.params))
            if unknown:
                known = ", ".join(sorted(self.params)) or "none"
                raise ScriptError(f"unknown parameter(s) {', '.join(unknown)}; this script's PARAMS: {known}",
                                  str(self.path))
            merged.update(params)
        return merged


def load_experiment(path: str | Path) -> Experiment:
    """Import the script at ``path`` and check it against the script contract."""
    path = resolve_script(path)
    spath = str(path)
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ScriptError(f"cannot read the script: {exc.strerror or exc}", spath) from None
    digest = hashlib.sha256(source).hexdigest()
    try:
        code = compile(source, spath, "exec")
    except SyntaxError as exc:
        raise ScriptError(f"syntax error: {exc.msg}", spath, exc.lineno) from None
    except ValueError as exc:
        raise ScriptError(f"cannot compile the script: {exc}", spath) from None
    mod_name = f"lrviz_user_{path.stem}_{digest[:10]}"
    spec = importlib.util.spec_from_file_location(mod_name, spath)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    linecache.checkcache(spath)
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[mod_name] = module
    try:
        exec(code, module.__dict__)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise error_from_exception(exc, spath, "importing the script") from None
    except SystemExit as exc:
        sys.modules.pop(mod_name, None)
        line = _script_line(exc, spath)
        raise ScriptError("the script called exit() while being imported; guard it with "
                          "if __name__ == '__main__':", spath, line) from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)

    for name in ("build_model", "build_data"):
        if not callable(getattr(module, name, None)):
            raise ScriptError(f"the script has no {name}() function; lrviz needs build_model() and build_data()",
                              spath)
    if not callable(getattr(module, "compute_loss", None)) and not callable(getattr(module, "loss_fn", None)):
        raise ScriptError("the script has neither loss_fn(output, target) nor compute_loss(model, batch)", spath)

    defaults = getattr(module, "DEFAULTS", {}) or {}
    if not isinstance(defaults, dict):
        raise ScriptError(f"DEFAULTS must be a dict, not {type(defaults).__name__}", spath)
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise ScriptError(f"DEFAULTS has unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(DEFAULT_KEYS)}", spath)
    from .config import RunConfig
    from .errors import ConfigError

    try:
        RunConfig(**defaults).validated()
    except ConfigError as exc:
        raise ScriptError(f"DEFAULTS: {exc}", spath, _assignment_line(spath, "DEFAULTS")) from None
    params = getattr(module, "PARAMS", {}) or {}
    if not isinstance(params, dict):
        raise ScriptError(f"PARAMS must be a dict of knob names to default values, not {type(params).__name__}",
                          spath)
    doc = inspect.cleandoc(module.__doc__ or "")
    return Experiment(path=path, module=module, source_hash=digest, defaults=dict(defaults),
                      params=dict(params), doc=doc)
