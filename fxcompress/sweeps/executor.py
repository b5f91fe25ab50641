"""One trial executor for sweeps and searches: in-process, local worker processes, or Ray.

A *trial* is a :class:`Task`: a module-level function (named ``"package.module:function"`` so a
fresh process imports it itself), its picklable arguments, and the resources it declares. Every
executor turns each task into one plain-dict *record* and hands it to ``on_record`` as soon as it
finishes, so a sweep can log it before the next one ends:

- :class:`SequentialExecutor` (default, no extra dependency) calls tasks one after another in this
  process. An exception becomes a record; a crash or memory exhaustion takes the sweep down with it.
- :class:`ProcessExecutor` runs each task in its own fresh process (forked from a fork server that
  has the libraries imported, so it starts fast) with an address-space cap
  (``RLIMIT_AS``) and a time limit, ``workers`` at a time. A task that raises, crashes, runs out of
  memory or time becomes a record (status ``error``/``crashed``/``out_of_memory``/``timeout``) and
  the other tasks go on.
- :class:`RayExecutor` submits one Ray task per trial (``num_cpus``, ``num_gpus`` as declared) to
  a local Ray instance or an existing cluster; inside, the trial runs in the same capped child
  process as above, so a dying trial never takes a Ray worker with it.

Timed trials declare ``exclusive=True``: they never share a machine's cores or a GPU with another
trial. The process executor drains running trials before one starts and starts nothing beside it;
Ray reserves every CPU of the node (and its GPU), so other trials wait or go to other nodes.
Compile trials (``exclusive=False``, one CPU) run side by side.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import resource
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fxcompress.errors import FxCompressError, InputError

#: Record statuses an executor itself produces (a trial function adds its own, e.g. "ok").
ERROR, CRASHED, OUT_OF_MEMORY, TIMEOUT = "error", "crashed", "out_of_memory", "timeout"
_ALLOCATION_FAILURES = ("can't allocate memory", "DefaultCPUAllocator", "std::bad_alloc", "Cannot allocate memory")
_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Task:
    """One trial: ``function(*args) -> dict`` and the resources it needs.

    Attributes:
        key: unique name of the trial (the results log is keyed by it).
        function: ``"package.module:function"``; resolved in the process that runs it.
        args: picklable positional arguments.
        cpus: cores the trial uses (its torch/ORT thread count in a worker process).
        gpus: 0 or 1.
        exclusive: a timed trial: the machine (all its cores, its GPU) to itself.
    """

    key: str
    function: str
    args: tuple = ()
    cpus: int = 1
    gpus: int = 0
    exclusive: bool = False


OnRecord = Callable[[Task, dict], None]


def _resolve(reference: str) -> Callable[..., dict]:
    module_name, _, name = reference.partition(":")
    return getattr(importlib.import_module(module_name), name)


def _limit_threads(cpus: int) -> None:
    """Keep a trial on the cores it declared (set before torch is imported by the trial)."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(cpus)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(cpus)


def _failure(status: str, exc: BaseException | None = None, detail: str | None = None) -> dict:
    record: dict[str, Any] = {"status": status}
    if exc is not None:
        record["error_type"] = type(exc).__name__
        record["error"] = str(exc)[:2000]
        if not isinstance(exc, FxCompressError):  # an internal failure: keep where it happened
            record["traceback"] = "".join(traceback.format_exception(exc)[-6:])[-3000:]
    if detail is not None:
        record["error"] = detail
    return record


def call_task(task: Task) -> dict:
    """Run ``task`` here and now: its record, or a record saying why it raised."""
    start = time.perf_counter()
    try:
        record = dict(_resolve(task.function)(*task.args))
    except MemoryError as exc:
        record = _failure(OUT_OF_MEMORY, exc)
    except Exception as exc:  # noqa: BLE001 - a trial's failure is its record, the sweep goes on
        allocation = any(marker in str(exc) for marker in _ALLOCATION_FAILURES)
        record = _failure(OUT_OF_MEMORY if allocation else ERROR, exc)
    record.setdefault("seconds", round(time.perf_counter() - start, 2))
    return record


class Executor:
    """Runs tasks and reports each one's record as it finishes (use as a context manager)."""

    name = "executor"

    def run(self, tasks: Sequence[Task], on_record: OnRecord) -> None:
        """Run every task; ``on_record(task, record)`` once per task, in completion order."""
        raise NotImplementedError

    def map(self, tasks: Sequence[Task]) -> list[dict]:
        """The records of ``tasks``, in the order given."""
        records: dict[str, dict] = {}
        self.run(tasks, lambda task, record: records.__setitem__(task.key, record))
        return [records[t.key] for t in tasks]

    def map_calls(self, function: Callable[[Any], Any], items: list) -> list:
        """``[function(item) for item in items]`` as trials of this executor: how a compile's
        per-layer sensitivity and metric trials run (``compile(..., options=CompileOptions(executor=...))``). ``function``
        is usually a closure over the graph, so only executors that can ship one support it."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (worker processes, the Ray connection)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SequentialExecutor(Executor):
    """Tasks one after another in this process: no isolation, no extra dependency."""

    name = "sequential"

    def run(self, tasks: Sequence[Task], on_record: OnRecord) -> None:
        for task in tasks:
            on_record(task, call_task(task))

    def map_calls(self, function: Callable[[Any], Any], items: list) -> list:
        return [function(item) for item in items]


# --- one trial in its own capped process --------------------------------------------------------


def _die_with(owner: int) -> None:
    """End this trial's process when ``owner`` (the sweep that started it) is gone, so a sweep
    stopped with SIGTERM or SIGKILL leaves no orphaned trial running. (The trial's parent is the
    fork server, which outlives a killed sweep while it has children, so the kernel's
    parent-death signal is not enough.)"""
    import threading

    def watch() -> None:
        while True:
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, another user's (cannot happen for our own parent)
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, name="fxcompress-owner-watch", daemon=True).start()


def _child_main(connection, task: Task, memory_bytes: int | None, owner: int, stderr_path: str) -> None:
    """Entry point of a trial's process: cap memory and threads, run, send the record back.
    Its stderr goes to ``stderr_path``, whose tail the parent puts in the record if it dies."""
    import faulthandler

    with open(stderr_path, "ab", buffering=0) as stderr:
        os.dup2(stderr.fileno(), 2)
    faulthandler.enable()  # a native crash leaves the Python stack in that tail
    _die_with(owner)
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    _limit_threads(task.cpus)
    record = call_task(task)
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    connection.send(record)
    connection.close()


#: Imported once by the fork server, so that a trial's fresh process starts in milliseconds instead
#: of importing torch, ONNX and fxcompress again (tens of seconds on a busy 2-core machine).
_PRELOAD = ["fxcompress", "fxcompress.sweeps.trials"]


def _trial_context() -> multiprocessing.context.BaseContext:
    """Where trial processes come from: a fork server (a clean single-threaded process that has
    imported the libraries and forks one child per trial), or spawn where there is none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


class _Running:
    """A trial's process and what the parent needs to judge how it ended."""

    def __init__(self, task: Task, memory_bytes: int | None, time_limit: float | None) -> None:
        context = _trial_context()
        self.task = task
        self.memory_bytes = memory_bytes
        self.receiver, sender = context.Pipe(duplex=False)
        handle, self.stderr_path = tempfile.mkstemp(prefix="fxcompress-trial-", suffix=".stderr")
        os.close(handle)
        self.process = context.Process(target=_child_main, args=(sender, task, memory_bytes, os.getpid(), self.stderr_path),
                                       daemon=True,
                                       name=f"fxcompress-trial-{task.key}"[:60])
        self.start = time.perf_counter()
        self.deadline = None if time_limit is None else self.start + time_limit
        self.time_limit = time_limit
        self.process.start()
        sender.close()  # the child holds the only writer: EOF here means it died

    def poll(self) -> dict | None:
        """The record if the trial ended (normally or not), else None."""
        if self.receiver.poll():
            try:
                record = self.receiver.recv()
            except (EOFError, OSError):
                record = None
            self.process.join(5)
            if record is not None:
                return record
            return self._death()
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.kill()
            return _failure(TIMEOUT, detail=f"the trial ran past its time limit of {self.time_limit:g} s and was stopped")
        if not self.process.is_alive():
            return self._death()
        return None

    def _death(self) -> dict:
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            if -code == signal.SIGKILL:
                record = _failure(OUT_OF_MEMORY, detail="the trial's process was killed by SIGKILL, most likely by the "
                                  "kernel's out-of-memory killer")
            else:
                record = _failure(CRASHED, detail=f"the trial's process died from signal {name}")
        else:
            record = _failure(CRASHED, detail=f"the trial's process exited with status {code} before reporting a result")
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.stderr_path) - 2000))
                tail = f.read().decode(errors="replace").strip()
        except OSError:
            tail = ""
        if tail:
            record["stderr_tail"] = tail
        return record

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.receiver.close()
        with contextlib.suppress(OSError):
            os.remove(self.stderr_path)


def run_isolated(task: Task, memory_bytes: int | None = None, time_limit: float | None = None) -> dict:
    """Run ``task`` in its own fresh process (capped at ``memory_bytes`` of address space and
    ``time_limit`` seconds) and return its record, or one saying how the process died."""
    running = _Running(task, memory_bytes, time_limit)
    try:
        while (record := running.poll()) is None:
            time.sleep(_POLL_SECONDS)
    finally:
        running.kill()
    record.setdefault("seconds", round(time.perf_counter() - running.start, 2))
    return record


class ProcessExecutor(Executor):
    """Each task in its own fresh process, ``workers`` at a time (exclusive tasks alone).

    Args:
        workers: how many non-exclusive trials run at once (default: the machine's cores).
        memory_gb: address-space cap of each trial's process (``RLIMIT_AS``); None: no cap. Address
            space is far more than resident memory (torch and ONNX Runtime reserve several GiB, a
            compile holds copies of the model): allow a few times the model's working set.
        time_limit: seconds a trial may run before it is stopped; None: no limit.
    """

    name = "processes"

    def __init__(self, workers: int | None = None, memory_gb: float | None = None, time_limit: float | None = None) -> None:
        workers = (os.cpu_count() or 1) if workers is None else workers
        if not isinstance(workers, int) or workers < 1:
            raise InputError(f"The process executor needs at least one worker, got {workers!r}.", "use workers=2 (or more).")
        check_limits(memory_gb, time_limit)
        self.workers = workers
        self.memory_bytes = None if memory_gb is None else int(memory_gb * (1 << 30))
        self.time_limit = time_limit

    def run(self, tasks: Sequence[Task], on_record: OnRecord) -> None:
        pending = list(tasks)
        running: list[_Running] = []
        try:
            while pending or running:
                for trial in list(running):
                    record = trial.poll()
                    if record is not None:
                        trial.kill()
                        running.remove(trial)
                        record.setdefault("seconds", round(time.perf_counter() - trial.start, 2))
                        on_record(trial.task, record)
                # First come, first served: an exclusive task waits for the running ones to drain
                # and blocks later tasks until it ends (so it is never starved, never shares).
                while pending and self._fits(pending[0], running):
                    running.append(_Running(pending.pop(0), self.memory_bytes, self.time_limit))
                time.sleep(_POLL_SECONDS)
        finally:
            for trial in running:
                trial.kill()

    def map_calls(self, function: Callable[[Any], Any], items: list) -> list:
        raise InputError("The process executor runs named trial functions (package.module:function), and a "
                         "compile's per-layer trials are closures over the model's graph, which it cannot ship.",
                         "pass executor=RayExecutor(...) (Ray ships closures) or leave executor out to run them here.")

    def _fits(self, task: Task, running: list[_Running]) -> bool:
        if task.exclusive or any(r.task.exclusive for r in running):
            return not running
        return len(running) < self.workers


def check_limits(memory_gb: float | None, time_limit: float | None) -> None:
    """InputError unless the caps are positive numbers (or None)."""
    for what, value in (("memory_gb", memory_gb), ("time_limit", time_limit)):
        if value is not None and (not isinstance(value, (int, float)) or not value > 0):
            raise InputError(f"The trial cap {what}={value!r} is not a positive number.",
                             f"give {what} in {'GiB' if what == 'memory_gb' else 'seconds'} (e.g. 8), or None for no cap.")


# --- Ray ---------------------------------------------------------------------------------------


def _ray_trial(task: Task, memory_bytes: int | None, time_limit: float | None) -> dict:
    """What a Ray task runs: the trial in its own capped process on that node."""
    record = run_isolated(task, memory_bytes, time_limit)
    import ray

    record["node"] = ray.get_runtime_context().get_node_id()
    return record


def _call_one(function: Callable[[Any], Any], item: Any) -> Any:
    return function(item)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (and clearly) when nothing listens at ``host:port``; Ray itself retries for minutes."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except ValueError:
        raise InputError(f"The Ray address {address!r} is not HOST:PORT.",
                         "give the head node's address as `ray start --head` printed it, e.g. 10.0.0.5:6379, "
                         "or `auto` for a local Ray instance.") from None
    except OSError as exc:
        raise InputError(f"No Ray cluster answers at {address} ({exc.strerror or exc}).",
                         "start one there with `ray start --head --port=PORT` (and `ray start --address=HEAD:PORT` on "
                         "each other machine), check the address and firewall, or use `auto` for a local Ray instance.") from None


class RayExecutor(Executor):
    """One Ray task per trial, on a local Ray instance (``address="auto"``) or an existing cluster.

    Args:
        address: ``"auto"`` starts a local instance with ``num_cpus`` CPUs; ``HOST:PORT`` (or
            ``ray://HOST:PORT``) connects to a running cluster.
        num_cpus: CPUs of the local instance (default: all of this machine's).
        memory_gb, time_limit: the caps of each trial's process, as in :class:`ProcessExecutor`.
    """

    name = "ray"

    def __init__(self, address: str = "auto", num_cpus: int | None = None, memory_gb: float | None = None,
                 time_limit: float | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise InputError("Ray is not installed, so the sweep cannot run on Ray.",
                             "pip install 'fxcompress[ray]' (or drop --ray to run in local processes).") from None
        check_limits(memory_gb, time_limit)
        self._ray = ray
        self.memory_bytes = None if memory_gb is None else int(memory_gb * (1 << 30))
        self.time_limit = time_limit
        self._owned = False
        if not ray.is_initialized():
            if address in (None, "auto", "local"):
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                _check_reachable(address)
                try:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                except Exception as exc:  # noqa: BLE001 - Ray's own ConnectionError and friends
                    raise InputError(f"Could not join the Ray cluster at {address}: {type(exc).__name__}: {str(exc)[:300]}",
                                     "check that `ray status --address=...` works from this machine and that both "
                                     "run the same Ray and Python versions.") from None
            self._owned = True
        self._remote = ray.remote(max_retries=0)(_ray_trial)

    def node_cpus(self) -> int:
        """CPUs of the largest live node: what an exclusive trial reserves."""
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        return int(max((n["Resources"].get("CPU", 1) for n in nodes), default=1))

    def run(self, tasks: Sequence[Task], on_record: OnRecord) -> None:
        ray = self._ray
        whole_node = self.node_cpus()
        started = {}
        for task in tasks:
            cpus = whole_node if task.exclusive else min(task.cpus, whole_node)
            ref = self._remote.options(num_cpus=cpus, num_gpus=task.gpus).remote(task, self.memory_bytes, self.time_limit)
            started[ref] = task
        while started:
            done, _ = ray.wait(list(started), num_returns=1)
            task = started.pop(done[0])
            try:
                record = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - the Ray worker or its node died
                record = _failure(CRASHED, exc)
            on_record(task, record)

    def map_calls(self, function: Callable[[Any], Any], items: list) -> list:
        # The closure (graph, batches) is put in the object store once and shared by every trial.
        try:
            shared = self._ray.put(function)
        except Exception as exc:  # noqa: BLE001 - cloudpickle's TypeError/RuntimeError on an unshippable object
            raise InputError(f"Ray cannot serialize these trials ({type(exc).__name__}: {str(exc)[:200]}), so they cannot "
                             "run on other workers.", "leave executor out to run them in this process.") from None
        remote = self._ray.remote(max_retries=0, num_cpus=1)(_call_one)
        return self._ray.get([remote.remote(shared, item) for item in items])

    def close(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
        self._owned = False


def make_executor(workers: int = 0, ray: str | None = None, ray_cpus: int | None = None,
                  memory_gb: float | None = None, time_limit: float | None = None) -> Executor:
    """The executor a sweep option names: Ray if ``ray`` is given, else ``workers`` local processes
    (``workers >= 1``), else in-process and sequential (``workers == 0``)."""
    if ray is not None:
        return RayExecutor(ray, ray_cpus, memory_gb, time_limit)
    if workers:
        return ProcessExecutor(workers, memory_gb, time_limit)
    if memory_gb is not None or time_limit is not None:
        raise InputError("A memory cap or time limit needs each trial in its own process, and the sequential "
                         "executor runs trials in this one.", "add workers=1 (--workers 1) or more, or use Ray.")
    return SequentialExecutor()
