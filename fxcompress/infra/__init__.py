"""Pass infrastructure: the pass contract, registry, manager, instruments and recipes."""

from fxcompress.infra.instrument import Instrument, PassRecord, RollbackPass
from fxcompress.infra.instruments import DumpIR, PrintAfterChange, RecordDiff, Timing, VerifyNumerics
from fxcompress.infra.manager import PassManager
from fxcompress.infra.pass_base import NoOptions, Pass, PassResult, Rejection, option
from fxcompress.infra.registry import available_passes, create_pass, pass_class, register

__all__ = [
    "DumpIR", "Instrument", "NoOptions", "Pass", "PassManager", "PassRecord", "PassResult",
    "PrintAfterChange", "RecordDiff", "Rejection", "RollbackPass", "Timing", "VerifyNumerics",
    "available_passes", "create_pass", "option", "pass_class", "register",
]
