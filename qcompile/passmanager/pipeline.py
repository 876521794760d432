"""Pipeline text: `fold,calibrate{method=entropy},quantize{weights=int4,activations=int8}`.

Grammar (whitespace is allowed around every token):

    pipeline := [pass ("," pass)*]
    pass     := NAME ["{" [opt ("," opt)*] "}"]
    opt      := NAME "=" [item (";" item)*]
    item     := BARE | '"' chars with \\" and \\\\ escapes '"'

BARE is a run of characters other than whitespace and `, { } = ; " \\`. Option values
are typed by the pass (see qcompile.passmanager.options). Every error is one line,
names the pipeline and the column (1-based), and says what was expected.
"""
from __future__ import annotations

from typing import Any, Dict, List, NoReturn, Optional, Type

from ..errors import PipelineError
from .base import Pass
from .options import SPECIAL_CHARS
from .registry import get_pass

__all__ = ["parse_pipeline", "format_pipeline"]


def parse_pipeline(text: str) -> List[Pass]:
    """The passes of a pipeline text, in order, with their options set."""
    if not isinstance(text, str):
        raise TypeError(f"a pipeline is text, not {type(text).__name__}")
    return _Parser(text).pipeline()


def format_pipeline(passes: List[Pass]) -> str:
    """The canonical text of `passes` (parse_pipeline of it gives the same passes)."""
    return ",".join(str(p) for p in passes)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    # -- helpers ---------------------------------------------------------------------
    def fail(self, message: str, at: Optional[int] = None) -> NoReturn:
        column = (self.pos if at is None else at) + 1
        raise PipelineError(f"pipeline {self.text!r}, column {column}: {message}", column=column)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def found(self) -> str:
        ch = self.peek()
        return f"found {ch!r}" if ch else "found the end of the text"

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def name(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "_-"):
            self.pos += 1
        return self.text[start:self.pos]

    # -- grammar ---------------------------------------------------------------------
    def pipeline(self) -> List[Pass]:
        passes: List[Pass] = []
        self.skip_ws()
        if not self.peek():
            return passes
        while True:
            passes.append(self.one_pass())
            self.skip_ws()
            if not self.peek():
                return passes
            if self.peek() != ",":
                self.fail(f"expected ',' between passes, {self.found()}")
            self.pos += 1
            self.skip_ws()

    def one_pass(self) -> Pass:
        start = self.pos
        name = self.name()
        if not name:
            self.fail(f"expected a pass name, {self.found()}")
        try:
            cls = get_pass(name)
        except PipelineError as e:
            self.fail(str(e), start)
        self.skip_ws()
        values: Dict[str, Any] = {}
        if self.peek() == "{":
            self.pos += 1
            values = self.options(cls, self.pos - 1)
        return cls(**values)

    def options(self, cls: Type[Pass], open_at: int) -> Dict[str, Any]:
        values: Dict[str, Any] = {}
        self.skip_ws()
        if self.peek() == "}":
            self.pos += 1
            return values
        while True:
            self.skip_ws()
            start = self.pos
            key = self.name()
            if not key:
                self.fail(f"expected an option name of pass {cls.name!r}, {self.found()}")
            try:
                spec = cls.option_spec(key)
            except PipelineError as e:
                self.fail(str(e), start)
            if key in values:
                self.fail(f"option {key!r} of pass {cls.name!r} is given twice", start)
            self.skip_ws()
            if self.peek() != "=":
                self.fail(f"expected '=' after option {key!r}, {self.found()}")
            self.pos += 1
            self.skip_ws()
            value_at = self.pos
            pieces = self.value()
            try:
                values[key] = spec.parse(pieces)
            except ValueError as e:
                self.fail(f"pass {cls.name!r} option {key!r}: {e}", value_at)
            self.skip_ws()
            ch = self.peek()
            if ch == ",":
                self.pos += 1
            elif ch == "}":
                self.pos += 1
                return values
            elif not ch:
                self.fail(f"the '{{' at column {open_at + 1} is never closed: expected '}}'")
            else:
                self.fail(f"expected ',' or '}}' after the value of option {key!r}, {self.found()} "
                          "(quote values with spaces or , { } = ; characters)")

    def value(self) -> List[str]:
        """The items of a value: `a;b;"c d"` -> ['a', 'b', 'c d']; nothing -> []."""
        if self.peek() in (",", "}", ""):
            return []
        pieces = [self.item()]
        while True:
            self.skip_ws()
            if self.peek() != ";":
                return pieces
            self.pos += 1
            self.skip_ws()
            pieces.append(self.item())

    def item(self) -> str:
        if self.peek() == '"':
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch in SPECIAL_CHARS or ch.isspace():
                break
            self.pos += 1
        if self.pos == start:
            self.fail(f"expected a value, {self.found()} (write an empty string as \"\")")
        return self.text[start:self.pos]

    def quoted(self) -> str:
        start = self.pos
        self.pos += 1
        out = []
        while True:
            ch = self.peek()
            if not ch:
                self.fail("the string opened here is never closed: expected '\"'", start)
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\":
                esc = self.peek()
                if esc not in ('"', "\\"):
                    self.fail("unknown escape in a quoted value: only \\\" and \\\\ are allowed", self.pos - 1)
                self.pos += 1
                ch = esc
            out.append(ch)
