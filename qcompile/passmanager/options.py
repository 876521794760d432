"""Typed pass options: declared with `option()`, typed by the class annotation.

    class Quantize(Pass):
        bits: int = option(8, "weight bit-width", choices=(2, 4, 8))
        layers: list = option((), "layers to quantize (all when empty)")

Types: int, float, bool, str, and lists of those (`list` alone means a list of str;
`list[int]` or `List[int]` a list of int). `choices` restricts the values (a `range`
works for integer intervals); for lists it restricts each item.

Text form, as written in pipelines (`quantize{bits=4,layers=conv1;conv2}`):
  * bool: `true` / `false` (also `1` / `0`, any case); printed `true` / `false`;
  * int and float: Python literals; printed as Python prints them (`1e-05`, `inf`);
  * str: bare when it has no space and none of `, { } = ; " \\`, else in double quotes
    with `\\"` and `\\\\` escapes (`name="a b"`);
  * list: items separated by `;` (`layers=conv1;conv2`); nothing after `=` is the empty
    list; a list of one empty string is `""`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ["Option", "option", "format_value", "needs_quotes", "SCALAR_TYPES"]

SCALAR_TYPES = (bool, int, float, str)
SPECIAL_CHARS = frozenset(',{}=;"\\')
_MISSING = object()


@dataclasses.dataclass
class Option:
    """One option of a pass: its default, help text, choices and (once the class is
    created) its name, item type and whether it is a list."""

    default: Any
    help: str = ""
    choices: Optional[Sequence[Any]] = None
    name: str = ""
    type: type = str  # the item type: bool, int, float or str
    is_list: bool = False

    # -- declaration -----------------------------------------------------------------
    def bind(self, owner: type, name: str, annotation: Any) -> "Option":
        """A copy of this option bound to attribute `name` of pass class `owner` with the
        given annotation. Raises TypeError (a bug in the pass) when the declaration is
        inconsistent."""
        where = f"option {name!r} of pass class {owner.__qualname__}"
        item, is_list = _parse_annotation(annotation, where)
        bound = dataclasses.replace(self, name=name, type=item, is_list=is_list)
        if self.choices is not None and not isinstance(self.choices, range):
            bound.choices = tuple(self.choices)
            for c in bound.choices:
                if _check_scalar(item, c) is _MISSING:
                    raise TypeError(f"{where}: choice {c!r} is not a {item.__name__}")
        if self.default is not None:
            try:
                bound.default = bound.convert(self.default)
            except ValueError as e:
                raise TypeError(f"{where}: bad default: {e}") from None
        return bound

    # -- values ----------------------------------------------------------------------
    @property
    def type_name(self) -> str:
        return f"list of {self.type.__name__}" if self.is_list else self.type.__name__

    def expected(self) -> str:
        """What a valid value looks like, for error messages: `int, one of 2, 4, 8`."""
        text = self.type_name
        if self.choices is not None:
            text += ", " + ("each " if self.is_list else "") + "one of " + _choices_text(self.choices, ", ")
        return text

    def convert(self, value: Any) -> Any:
        """Check a Python value and return it normalised (ints accepted as floats,
        tuples as lists). Raises ValueError saying what was expected."""
        if self.is_list:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ValueError(f"expected {self.expected()}, got {value!r}")
            return [self._convert_item(v, value) for v in value]
        return self._convert_item(value, value)

    def _convert_item(self, item: Any, whole: Any) -> Any:
        out = _check_scalar(self.type, item)
        if out is _MISSING:
            raise ValueError(f"expected {self.expected()}, got {whole!r}")
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"expected {self.expected()}, got {item!r}")
        return out

    def parse(self, pieces: List[str]) -> Any:
        """The value of the text pieces of `opt=a;b;c` (already unquoted), checked.
        Raises ValueError saying what was expected."""
        if self.is_list:
            return self.convert([self._parse_item(p) for p in pieces])
        if len(pieces) != 1:
            got = "nothing" if not pieces else repr(";".join(pieces)) + " (';' separates list items)"
            raise ValueError(f"expected {self.expected()}, got {got}")
        return self.convert(self._parse_item(pieces[0]))

    def _parse_item(self, text: str) -> Any:
        try:
            if self.type is bool:
                low = text.lower()
                if low in ("true", "1"):
                    return True
                if low in ("false", "0"):
                    return False
                raise ValueError
            if self.type is int:
                return int(text)
            if self.type is float:
                return float(text)
            return text
        except ValueError:
            raise ValueError(f"expected {self.expected()}, got {text!r}") from None

    def format(self, value: Any) -> str:
        """The canonical text of `value` (the inverse of `parse`)."""
        if self.is_list:
            return ";".join(format_value(v) for v in value)
        return format_value(value)

    # -- description -----------------------------------------------------------------
    def __str__(self) -> str:
        """One line for `qcompile passes`: `bits=8  (int: 2|4|8)  weight bit-width`."""
        default = "(unset)" if self.default is None else self.format(self.default) or "(empty)"
        kind = self.type_name
        if self.choices is not None:
            kind += ": " + _choices_text(self.choices, "|")
        return f"{self.name}={default}  ({kind})  {self.help}".rstrip()


def option(default: Any, help: str = "", *, choices: Optional[Sequence[Any]] = None) -> Any:
    """Declare a pass option; the class annotation gives its type. `default` None means
    "not set" (the pass decides). Returns an Option (typed Any so that
    `bits: int = option(8, ...)` type-checks)."""
    return Option(default, help, choices)


def format_value(value: Any) -> str:
    """Canonical text of one scalar option value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return _quote(text) if needs_quotes(text) else text


def needs_quotes(text: str) -> bool:
    """True when `text` cannot be written bare in a pipeline."""
    return not text or any(c in SPECIAL_CHARS or c.isspace() for c in text)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _choices_text(choices: Sequence[Any], sep: str) -> str:
    if isinstance(choices, range) and choices.step == 1 and len(choices) > 2:
        return f"{choices.start}..{choices.stop - 1}"
    return sep.join(format_value(c) for c in choices)


def _check_scalar(kind: type, value: Any) -> Any:
    """`value` as a `kind`, or _MISSING when it is not one (bools are not ints)."""
    if kind is bool:
        return value if isinstance(value, bool) else _MISSING
    if kind is int:
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _MISSING
    return value if isinstance(value, str) else _MISSING


_NAMES = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "List": list}


def _parse_annotation(annotation: Any, where: str) -> Tuple[type, bool]:
    """(item type, is_list) of an option annotation, given as a type or as a string
    (modules with `from __future__ import annotations`)."""
    if isinstance(annotation, str):
        annotation = _annotation_from_text(annotation.strip(), where)
    if annotation in SCALAR_TYPES:
        return annotation, False
    if annotation in (list, List):
        return str, True
    if typing.get_origin(annotation) is list:
        args = typing.get_args(annotation)
        if len(args) == 1 and args[0] in SCALAR_TYPES:
            return args[0], True
    raise TypeError(
        f"{where}: unsupported type {annotation!r}; use int, float, bool, str, or list[int|float|bool|str]"
    )


def _annotation_from_text(text: str, where: str) -> Any:
    if text in _NAMES:
        return _NAMES[text]
    for prefix in ("list[", "List[", "typing.List["):
        if text.startswith(prefix) and text.endswith("]"):
            inner = text[len(prefix):-1].strip()
            if inner in ("bool", "int", "float", "str"):
                return List[_NAMES[inner]]
    raise TypeError(
        f"{where}: unsupported type annotation {text!r}; use int, float, bool, str, or list[int|float|bool|str]"
    )
