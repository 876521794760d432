"""Pass infrastructure: the Pass contract, typed options, the registry, pipelines as
text that round-trips, the PassManager and its instruments.

    from qcompile.passmanager import Pass, PassResult, option, register_pass, PassManager

    @register_pass("my-pass")
    class MyPass(Pass):
        \"\"\"One-line summary shown by `qcompile passes`.\"\"\"
        bits: int = option(8, "weight bit-width", choices=(2, 4, 8))

        def run(self, model):
            return PassResult(model, modified=False)

    PassManager.parse("my-pass{bits=4}").run(model)
"""
from .base import Pass, PassResult
from .instruments import Instrument, PassStatistics, PrintIRInstrument, StatisticsInstrument, TimingInstrument
from .manager import PassManager
from .options import Option, option
from .registry import ENTRY_POINT_GROUP, available_passes, get_pass, register_pass

__all__ = [
    "ENTRY_POINT_GROUP",
    "Instrument",
    "Option",
    "Pass",
    "PassManager",
    "PassResult",
    "PassStatistics",
    "PrintIRInstrument",
    "StatisticsInstrument",
    "TimingInstrument",
    "available_passes",
    "get_pass",
    "option",
    "register_pass",
]
