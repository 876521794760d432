"""The pass contract: `Pass` subclasses declare typed options and implement `run`; the
base class validates options, checks what `run` returns, and keeps per-run counters.

    @register_pass("dce")
    class DeadCodeElimination(Pass):
        \"\"\"Remove nodes whose results are never used.\"\"\"
        in_place = True
        aggressive: bool = option(False, "also remove nodes of custom domains")

        def run(self, model):
            ...
            self.stats["nodes removed"] += removed
            return PassResult(model, modified=removed > 0)
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import difflib
import inspect
import re
from typing import Any, ClassVar, Dict, Tuple

from ..errors import PipelineError
from ..ir.model import Model
from .options import Option

__all__ = ["Pass", "PassResult"]


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass returns: the resulting model and whether the pass changed anything."""

    model: Model
    modified: bool


class Pass(abc.ABC):
    """Base class of passes. Subclasses implement `run(model) -> PassResult` and may
    override the `requires(model)` / `ensures(model)` hooks, which raise when a pre- or
    postcondition fails.

    Class attributes: `name` (set by `register_pass`; unregistered classes get their
    class name in kebab-case), `in_place` (True promises `run` returns the very model it
    was given; checked), and the options declared with `option()`. `self.stats` is a
    Counter reset at every call: bump it (`self.stats["rules fired"] += 1`) and the
    StatisticsInstrument reports it. A subclass that needs its own `__init__` must
    accept `**options` and call `super().__init__(**options)`.
    """

    name: ClassVar[str] = "pass"
    in_place: ClassVar[bool] = False
    _options: ClassVar[Dict[str, Option]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = _kebab(cls.__name__)
        annotations = _annotations(cls)
        options = dict(cls._options)  # inherited ones first
        for attr, value in list(cls.__dict__.items()):
            if not isinstance(value, Option):
                continue
            where = f"option {attr!r} of pass class {cls.__qualname__}"
            if attr in _RESERVED or attr.startswith("_"):
                raise TypeError(f"{where}: the name is reserved by Pass (or private); rename the option")
            if attr not in annotations:
                raise TypeError(f"{where} has no type: write `{attr}: int = option(...)` (int, float, bool, str or list)")
            bound = value.bind(cls, attr, annotations[attr])
            setattr(cls, attr, bound)
            options[attr] = bound
        cls._options = options

    def __init__(self, **options: Any) -> None:
        """Set options by keyword; unknown names and bad values raise PipelineError."""
        given: Dict[str, Any] = {}
        for key, value in options.items():
            spec = type(self).option_spec(key)
            try:
                given[key] = spec.convert(value)
            except ValueError as e:
                raise PipelineError(f"pass {self.name!r} option {key!r}: {e}") from None
        for key, spec in self._options.items():
            value = given.get(key, spec.default)
            setattr(self, key, list(value) if isinstance(value, list) else value)
        self._given = given
        self.stats: collections.Counter = collections.Counter()

    # -- running ---------------------------------------------------------------------
    @abc.abstractmethod
    def run(self, model: Model) -> PassResult:
        """Transform `model` (in place or into a new Model) and say whether it changed."""

    def requires(self, model: Model) -> None:
        """Precondition hook, called before `run`: raise (a QCompileError for a user's
        mistake, such as a missing earlier pass) when the pass cannot run on `model`."""

    def ensures(self, model: Model) -> None:
        """Postcondition hook, called on the result of `run`: raise when it is wrong."""

    def __call__(self, model: Model) -> PassResult:
        """Run the pass with its contract checked: requires, run, result checks, ensures."""
        if not isinstance(model, Model):
            raise TypeError(f"pass {self.name!r} runs on a qcompile Model, not {type(model).__name__}")
        self.stats = collections.Counter()
        self.requires(model)
        result = self.run(model)
        if not isinstance(result, PassResult):
            raise TypeError(
                f"bug in pass {self.name!r}: run() returned {type(result).__name__}, not a PassResult; "
                "end run() with `return PassResult(model, modified)`"
            )
        if not isinstance(result.model, Model):
            raise TypeError(
                f"bug in pass {self.name!r}: its PassResult holds a {type(result.model).__name__}, "
                "not a qcompile Model"
            )
        if self.in_place and result.model is not model:
            raise TypeError(
                f"bug in pass {self.name!r}: it declares in_place = True but returned a different Model; "
                "return the model it was given, or declare in_place = False"
            )
        self.ensures(result.model)
        return result

    # -- description -----------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring (shown by `qcompile passes`)."""
        doc = inspect.cleandoc(cls.__doc__ or "")
        return doc.splitlines()[0].strip() if doc else "(undocumented)"

    @classmethod
    def description(cls) -> str:
        """The whole class docstring, dedented."""
        return inspect.cleandoc(cls.__doc__ or "")

    @classmethod
    def options(cls) -> Tuple[Option, ...]:
        """The declared options in order; `str(option)` is a one-line description."""
        return tuple(cls._options.values())

    @classmethod
    def option_spec(cls, key: str) -> Option:
        """The Option called `key`; PipelineError listing the valid ones when absent."""
        spec = cls._options.get(key)
        if spec is None:
            valid = sorted(cls._options)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listing = f"valid options: {', '.join(valid)}" if valid else "it takes no options"
            raise PipelineError(f"pass {cls.name!r} has no option {key!r}{hint} ({listing})")
        return spec

    @property
    def given_options(self) -> Dict[str, Any]:
        """The options set explicitly, in the order given (what `str()` prints)."""
        return dict(self._given)

    def __str__(self) -> str:
        """The pipeline text of this pass: `quantize{bits=4,method=entropy}`."""
        if not self._given:
            return self.name
        opts = ",".join(f"{k}={self._options[k].format(v)}" for k, v in self._given.items())
        return f"{self.name}{{{opts}}}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"


_RESERVED = frozenset(dir(Pass)) | {"stats", "name", "in_place"}


def _kebab(class_name: str) -> str:
    """`DeadCodeElimination` -> `dead-code-elimination`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", class_name).lower()


def _annotations(cls: type) -> Dict[str, Any]:
    """The class's own annotations, evaluated when possible (strings otherwise)."""
    try:
        return inspect.get_annotations(cls, eval_str=True)
    except Exception:  # names only the option parser understands as text
        return inspect.get_annotations(cls)
