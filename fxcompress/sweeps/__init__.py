"""Sweeps: many models x recipes as isolated trials through one executor (sequential, local
processes or Ray), with a resumable JSON-lines log and a rendered table."""

from fxcompress.sweeps.executor import (  # noqa: F401
    Executor, ProcessExecutor, RayExecutor, SequentialExecutor, Task, make_executor, run_isolated,
)
from fxcompress.sweeps.run import SweepOptions, SweepResult, sweep  # noqa: F401

__all__ = ["Executor", "ProcessExecutor", "RayExecutor", "SequentialExecutor", "SweepOptions", "SweepResult", "Task",
           "make_executor", "run_isolated", "sweep"]
