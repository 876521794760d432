"""The PassManager: runs passes in order, verifies the IR after each, calls the
instruments, and names the pass at fault when anything goes wrong."""
from __future__ import annotations

from typing import Iterable, Iterator, List

from ..errors import PassFailedError, QCompileError
from ..ir.model import Model
from ..ir.verifier import VerificationError, verify
from .base import Pass, PassResult
from .instruments import Instrument
from .pipeline import format_pipeline, parse_pipeline

__all__ = ["PassManager"]


class PassManager:
    """An ordered list of passes. `verify` runs the IR verifier on the input and after
    every pass; `instruments` get hooks around each pass.

        pm = PassManager.parse("canonicalize,dce")
        result = pm.run(model)          # PassResult(model, modified)
        str(pm) == "canonicalize,dce"
    """

    def __init__(self, passes: Iterable[Pass] = (), verify: bool = True, instruments: Iterable[Instrument] = ()):
        self.passes: List[Pass] = list(passes)
        for p in self.passes:
            if isinstance(p, type) and issubclass(p, Pass):
                raise TypeError(f"PassManager takes Pass instances: write {p.__name__}() instead of the class")
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager takes Pass instances, not {type(p).__name__} ({p!r})")
        self.verify = verify
        self.instruments: List[Instrument] = list(instruments)

    @classmethod
    def parse(cls, text: str, verify: bool = True, instruments: Iterable[Instrument] = ()) -> "PassManager":
        """A PassManager for pipeline text such as `fold,quantize{bits=4}` (empty text:
        no passes). Raises PipelineError, one line naming the column, on bad text."""
        return cls(parse_pipeline(text), verify=verify, instruments=instruments)

    def __str__(self) -> str:
        """The canonical pipeline text; parsing it gives an equal pipeline."""
        return format_pipeline(self.passes)

    def __repr__(self) -> str:
        return f"PassManager({str(self)!r})"

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def run(self, model: Model) -> PassResult:
        """Run every pass in order. A pass that raises, or leaves a graph the verifier
        rejects, becomes a PassFailedError naming it and the passes before it."""
        if not isinstance(model, Model):
            raise TypeError(f"PassManager.run takes a qcompile Model, not {type(model).__name__}")
        if self.verify:
            problems = verify(model)
            if problems:
                raise QCompileError(f"the input model is invalid before any pass ran: {_summary(problems)}")
        for inst in self.instruments:
            inst.before_pipeline(model)
        ran: List[str] = []
        modified = False
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, model)
            prefix = f"pass {p.name!r} failed after [{', '.join(ran)}]"
            try:
                result = p(model)
            except QCompileError as e:
                raise PassFailedError(f"{prefix}: {e}", p.name, ran) from e
            except Exception as e:
                raise PassFailedError(f"{prefix}: {type(e).__name__}: {e}", p.name, ran) from e
            for inst in self.instruments:
                inst.after_pass(p, result)
            if self.verify:
                problems = verify(result.model)
                if problems:
                    raise PassFailedError(
                        f"{prefix}: it left an invalid graph (a bug in the pass): {_summary(problems)}",
                        p.name, ran,
                    ) from VerificationError(problems)
            ran.append(p.name)
            model = result.model
            modified = modified or bool(result.modified)
        final = PassResult(model, modified)
        for inst in self.instruments:
            inst.after_pipeline(final)
        return final


def _summary(problems: List[str]) -> str:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return problems[0] + more
