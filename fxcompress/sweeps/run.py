"""``fxcompress.sweep``: model specs x recipes through one executor into a resumable log and a table."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fxcompress.api import refuse_moved_keywords
from fxcompress.errors import InputError
from fxcompress.sweeps.executor import Executor, Task, make_executor
from fxcompress.sweeps.log import TrialLog
from fxcompress.sweeps.table import to_html, to_markdown
from fxcompress.sweeps.trials import TrialOptions, make_tasks, read_spec_file


@dataclass
class SweepResult:
    """Every trial's record (this run's and the log's), in sweep order, and what this run did."""

    records: list[dict]
    ran: int
    skipped: int
    executor: str
    log: Path | None = None
    tables: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        """Records whose status is not ``ok``."""
        return [r for r in self.records if r.get("status") != "ok"]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): every trial's record, what this run did, the log and the tables."""
        return {"records": [dict(r) for r in self.records], "ran": self.ran, "skipped": self.skipped,
                "executor": self.executor, "log": str(self.log) if self.log is not None else None,
                "tables": [str(t) for t in self.tables]}

    def to_text(self) -> str:
        """The table of all trials as markdown (what ``fxcompress sweep`` prints)."""
        return self.markdown()

    def __str__(self) -> str:
        return self.to_text()

    def markdown(self, title: str = "fxcompress sweep") -> str:
        """The table of all trials as markdown."""
        return to_markdown(self.records, title)

    def html(self, title: str = "fxcompress sweep") -> str:
        """The table of all trials as an HTML page."""
        return to_html(self.records, title)


@dataclass(frozen=True)
class SweepOptions:
    """The settings of :func:`sweep` that most sweeps leave at their defaults, in one object.

    ``sweep``'s own keywords are what changes from one sweep to the next: the models and recipes,
    the log and table, how many worker processes, the calibration data and bounds every trial is
    compiled with, whether trials are timed. These options say where else trials may run (Ray, an
    executor of your own) and under which caps, how models are loaded, and how timing runs::

        fxcompress.sweep(specs, ["default", "int8"], log="sweep.jsonl", workers=2,
                         options=fxcompress.SweepOptions(memory_gb=16, time_limit=1800))

    Attributes:
        ray: ``"auto"`` for a local Ray instance (``ray_cpus`` CPUs), or a running cluster's
            ``HOST:PORT``; each trial is a Ray task that runs in its own capped process.
        ray_cpus: CPUs of the local Ray instance (``ray="auto"``).
        executor: an :class:`~fxcompress.sweeps.executor.Executor` to use instead of ``workers``
            / ``ray`` (not closed by the sweep).
        memory_gb, time_limit: per-trial address-space cap (GiB) and time limit (s); need
            ``workers`` or ``ray``. A trial past them is recorded as out_of_memory / timeout.
        provider: the ONNX Runtime provider benchmark trials are timed on ("cpu" or "cuda").
        runs: timed runs per variant in benchmark trials.
        input_shapes: input shapes for every spec, as for ``fxcompress compile --input-shape``.
        trust_pickle: allow specs that are pickled modules (loading them runs code from the file).
    """

    ray: str | None = None
    ray_cpus: int | None = None
    executor: Executor | None = None
    memory_gb: float | None = None
    time_limit: float | None = None
    provider: str = "cpu"
    runs: int = 48
    input_shapes: Sequence[tuple[int, ...]] | None = None
    trust_pickle: bool = False


#: sweep() keywords that now live in :class:`SweepOptions`: a call still passing one is told where it went.
MOVED_TO_SWEEP_OPTIONS = ("ray", "ray_cpus", "executor", "memory_gb", "time_limit", "provider", "runs", "input_shapes",
                          "trust_pickle")


def _gpus_for(provider: str) -> int:
    if provider != "cuda":
        return 0
    import torch

    return 1 if torch.cuda.is_available() else 0


@refuse_moved_keywords(MOVED_TO_SWEEP_OPTIONS, "SweepOptions")
def sweep(
    specs: Sequence[str] | str | os.PathLike,
    recipes: Sequence[str] | str = ("default",),
    *,
    log: str | os.PathLike | None = None,
    table: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    workers: int = 0,
    calibration: str | None = None,
    tolerance: float | None = None,
    benchmark: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    options: SweepOptions | None = None,
) -> SweepResult:
    """Compile every model spec with every recipe, one isolated trial each.

    The keywords are what changes from one sweep to the next; where else trials run (Ray, an
    executor of your own) and under which caps, how models are loaded and how timing runs are
    one :class:`SweepOptions` object, ``options``.

    Args:
        specs: model SPECs (``torchvision:NAME``, ``package.module:function``, ``file.pt2``, ...)
            or the path of a file listing one per line.
        recipes: preset names or recipe paths; every spec runs with each.
        log: JSON-lines results log; trials already in it are skipped (resume), new records are
            appended as each trial finishes.
        table: where to write the table of all trials: ``.md`` (markdown) or ``.html``; a list for both.
        workers: 0 (default) runs trials in this process one by one; N >= 1 runs each in its own
            process, N at a time, with the options' caps. As with any Python multiprocessing, a
            script that does this must call sweep under ``if __name__ == "__main__":``.
        calibration, tolerance: as for ``fxcompress compile`` (calibration as its
            ``--calibration`` spec, e.g. ``"random:8"``), for every spec.
        benchmark: also time each result against the plain export (the options' ``runs`` and
            ``provider``); such trials are exclusive: they never share the machine with another trial.
        retry_failed: rerun logged trials whose status is not ``ok`` (others are still skipped).
        progress: a progress bar on stderr.
        options: a :class:`SweepOptions` (Ray, an executor, per-trial caps, input shapes, trust
            in pickled specs, the timing's provider and runs); default ``SweepOptions()``.

    Returns:
        a :class:`SweepResult`. Unknown spec forms and bad options raise InputError before any
        trial runs; a model that cannot be built, crashes or runs out of memory or time is its
        trial's record, and the sweep goes on.
    """
    if options is None:
        options = SweepOptions()
    if not isinstance(options, SweepOptions):
        raise InputError(f"options must be a fxcompress.SweepOptions, got a {type(options).__name__}.",
                         "pass options=fxcompress.SweepOptions(memory_gb=16, ...) or leave it out.")
    ray, ray_cpus, executor = options.ray, options.ray_cpus, options.executor
    memory_gb, time_limit, provider = options.memory_gb, options.time_limit, options.provider
    if isinstance(specs, (str, os.PathLike)):
        specs = read_spec_file(specs)
    recipes = [recipes] if isinstance(recipes, (str, os.PathLike)) else list(recipes)
    if not specs or not recipes:
        raise InputError("The sweep has no trials: it needs at least one model spec and one recipe.",
                         "give specs (or a spec file) and recipes, e.g. sweep(['torchvision:resnet18'], ['default']).")
    if provider not in ("cpu", "cuda"):
        raise InputError(f"Unknown provider {provider!r} for the sweep's benchmark.", "use provider='cpu' or 'cuda'.")
    shapes = tuple(map(tuple, options.input_shapes)) if options.input_shapes else None
    trial = TrialOptions(benchmark, provider, options.runs, shapes, options.trust_pickle, tolerance, calibration)
    tasks = make_tasks(specs, recipes, trial, gpus=_gpus_for(provider) if benchmark else 0)
    tables = [Path(t) for t in ([table] if isinstance(table, (str, os.PathLike)) else table or [])]
    for path in tables:
        if path.suffix.lower() not in (".md", ".html", ".htm"):
            raise InputError(f"Cannot tell which table format {path} is.", "end the table's name in .md or .html.")
    trial_log = TrialLog(log) if log is not None else None
    logged = trial_log.read() if trial_log else {}
    done = {key: r for key, r in logged.items() if r.get("status") == "ok" or not retry_failed}
    todo = [t for t in tasks if t.key not in done]
    records: dict[str, dict] = {t.key: done[t.key] for t in tasks if t.key in done}

    owned = executor is None
    runner = make_executor(workers, ray, ray_cpus, memory_gb, time_limit) if owned else executor
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"sweep ({runner.name})", unit="trial", file=sys.stderr, leave=True)

    def finished(task: Task, record: dict) -> None:
        spec, recipe = task.args[0], task.args[1]
        record = {"key": task.key, "spec": spec, "recipe": recipe, **record, "executor": runner.name}
        records[task.key] = record
        if trial_log is not None:
            trial_log.append(record)
        if bar is not None:
            bar.set_postfix_str(f"{spec.rsplit(':', 1)[-1][:24]}: {record.get('status')}")
            bar.update(1)

    try:
        runner.run(todo, finished)
    finally:
        if bar is not None:
            bar.close()
        if owned:
            runner.close()
    result = SweepResult([records[t.key] for t in tasks if t.key in records], len(todo), len(tasks) - len(todo), runner.name,
                         trial_log.path if trial_log else None, tables)
    for path in tables:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.html() if path.suffix.lower() in (".html", ".htm") else result.markdown())
    return result
