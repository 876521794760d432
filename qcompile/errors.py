"""User-facing errors: one line that names the file, node, option or input at fault.

The CLI prints `qcompile: error: <message>` and exits with code 2 for these; anything
else escaping is a bug and is reported as one.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["QCompileError", "ModelLoadError", "PipelineError", "PassFailedError"]


class QCompileError(Exception):
    """Base class of errors caused by the user's input, not by a bug in qcompile."""


class ModelLoadError(QCompileError):
    """A model file is missing, unreadable, not ONNX, or malformed."""


class PipelineError(QCompileError):
    """A pass pipeline names an unknown pass or option, or an option has a bad value.
    `column` (1-based) is set when the error is at a place in the pipeline text."""

    def __init__(self, message: str, column: Optional[int] = None):
        super().__init__(message)
        self.column = column


class PassFailedError(QCompileError):
    """A pass raised: the message names the pass and the passes that ran before it."""

    def __init__(self, message: str, pass_name: str = "", ran_before=()):
        super().__init__(message)
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
