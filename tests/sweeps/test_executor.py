"""The trial executors: records for success, exceptions, crashes, memory and time limits;
exclusive (timed) trials never overlap another; bad options are one-paragraph errors."""

from __future__ import annotations

import pytest

from fxcompress.errors import InputError
from fxcompress.sweeps.executor import ProcessExecutor, SequentialExecutor, Task, make_executor, run_isolated

FN = "tests.sweeps.trial_functions:"
MEMORY_GB = 6  # room for torch's own address space, far below what `hungry` asks for


def test_sequential_runs_in_this_process_and_records_exceptions():
    import os

    records = SequentialExecutor().map([Task("a", FN + "echo", (1,)), Task("b", FN + "raising")])
    assert records[0]["status"] == "ok" and records[0]["value"] == 1 and records[0]["pid"] == os.getpid()
    assert records[1]["status"] == "error" and records[1]["error_type"] == "ValueError"
    assert "raises on purpose" in records[1]["error"] and "seconds" in records[1]


def test_process_executor_isolates_crash_memory_and_time():
    tasks = [Task("ok1", FN + "echo", (1,)), Task("segv", FN + "segfault"), Task("oom", FN + "hungry"),
             Task("slow", FN + "forever"), Task("raise", FN + "raising"), Task("ok2", FN + "echo", (2,))]
    finished: list[str] = []
    records: dict[str, dict] = {}

    def on_record(task, record):
        finished.append(task.key)
        records[task.key] = record

    ProcessExecutor(workers=2, memory_gb=MEMORY_GB, time_limit=40).run(tasks, on_record)
    assert sorted(finished) == sorted(t.key for t in tasks)  # every trial reported exactly once
    assert records["ok1"].get("value") == 1 and records["ok2"].get("value") == 2, records
    assert records["segv"]["status"] == "crashed" and "SIGSEGV" in records["segv"]["error"]
    assert "Segmentation fault" in records["segv"]["stderr_tail"] and "in segfault" in records["segv"]["stderr_tail"]
    assert records["oom"]["status"] == "out_of_memory", records["oom"]
    assert records["slow"]["status"] == "timeout" and "40 s" in records["slow"]["error"]
    assert records["raise"]["status"] == "error" and records["raise"]["error_type"] == "ValueError"
    assert records["ok1"]["pid"] != records["ok2"]["pid"]  # a fresh process per trial


def test_run_isolated_returns_the_record_and_peak_memory():
    record = run_isolated(Task("x", FN + "echo", ("v",)), None, 60)
    assert record["status"] == "ok" and record["value"] == "v" and record["peak_rss_mb"] > 0


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_exclusive_trials_never_share_the_machine():
    tasks = [Task("c1", FN + "timed", (1.5,)), Task("c2", FN + "timed", (1.5,)), Task("bench", FN + "timed", (1.0,), exclusive=True),
             Task("c3", FN + "timed", (1.5,)), Task("c4", FN + "timed", (1.5,))]
    records = dict(zip([t.key for t in tasks], ProcessExecutor(workers=2).map(tasks)))
    assert all(r["status"] == "ok" for r in records.values()), records
    assert _overlap(records["c1"], records["c2"]) and _overlap(records["c3"], records["c4"])  # compile trials side by side
    assert not any(_overlap(records["bench"], records[k]) for k in ("c1", "c2", "c3", "c4"))


@pytest.mark.parametrize("make, words", [
    (lambda: ProcessExecutor(workers=0), "at least one worker"),
    (lambda: ProcessExecutor(workers=1, memory_gb=-2), "memory_gb=-2"),
    (lambda: ProcessExecutor(workers=1, time_limit=0), "time_limit=0"),
    (lambda: make_executor(0, memory_gb=4), "needs each trial in its own process"),
])
def test_bad_executor_options_are_clear_errors(make, words):
    with pytest.raises(InputError, match=words):
        make()
