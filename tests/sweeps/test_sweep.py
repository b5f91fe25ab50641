"""fxcompress.sweep and `fxcompress sweep`: tiny model specs x recipes into a resumable log and a
table; bad models are records, bad specs are clear errors; executors agree on the records."""

from __future__ import annotations

import json

import pytest

import fxcompress
from fxcompress.cli import main
from fxcompress.errors import InputError
from fxcompress.sweeps.log import TrialLog

SPECS = ["tests.models:conv_bn_relu", "tests.models:keyword_encoder"]
BAD = "tests.sweeps.trial_functions:"
#: Fields a trial measures (no timings, memory or executor name): what executors must agree on.
MEASURED = ("key", "status", "nodes_before", "nodes_after", "all_nodes_before", "all_nodes_after", "params_before",
            "params_after", "macs_before", "macs_after", "changed", "rolled_back", "passes_adding_nodes", "onnx_bytes",
            "parity_passed")


def _measured(record: dict) -> dict:
    return {k: record.get(k) for k in MEASURED}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_records_log_and_tables(tmp_path):
    log = tmp_path / "sweep.jsonl"
    result = fxcompress.sweep(SPECS, ["default"], log=log, table=[tmp_path / "t.md", tmp_path / "t.html"], progress=False)
    assert [r["status"] for r in result.records] == ["ok", "ok"], result.records
    conv = result.records[0]
    assert conv["spec"] == SPECS[0] and conv["recipe"] == "default" and conv["key"] == "tests.models:conv_bn_relu | default"
    assert conv["nodes_after"] < conv["nodes_before"] and "fold-batchnorm" in conv["changed"]
    assert conv["parity_passed"] and conv["parity_drift"] < 1e-5 and conv["onnx_bytes"] > 0 and conv["macs_before"] > 0
    assert [r["key"] for r in _lines(log)] == [r["key"] for r in result.records]
    markdown = (tmp_path / "t.md").read_text()
    assert "2 trials: 2 ok" in markdown and "| tests.models:conv_bn_relu | default | ok | pass" in markdown
    assert "<table>" in (tmp_path / "t.html").read_text()


def test_rerun_skips_finished_trials_and_retries_failed_on_request(tmp_path):
    log = tmp_path / "sweep.jsonl"
    first = fxcompress.sweep([SPECS[0], "tests.models:no_such_factory"], ["default"], log=log, progress=False)
    assert [r["status"] for r in first.records] == ["ok", "failed"]
    assert "has no callable 'no_such_factory'" in first.records[1]["error"]
    again = fxcompress.sweep([SPECS[0], "tests.models:no_such_factory"], ["default"], log=log, progress=False)
    assert (again.ran, again.skipped) == (0, 2) and len(_lines(log)) == 2
    assert [_measured(r) for r in again.records] == [_measured(r) for r in first.records]
    retried = fxcompress.sweep([SPECS[0], "tests.models:no_such_factory"], ["default"], log=log, retry_failed=True,
                               progress=False)
    assert (retried.ran, retried.skipped) == (1, 1) and len(_lines(log)) == 3
    assert len(TrialLog(log).read()) == 2  # the retried trial's later line replaces the earlier one


def test_a_torn_last_line_is_ignored_and_the_trial_runs_again(tmp_path):
    log = tmp_path / "sweep.jsonl"
    fxcompress.sweep([SPECS[0]], ["default"], log=log, progress=False)
    log.write_text(log.read_text() + '{"key": "tests.models:keyword_encoder | default", "sta')  # killed mid-write
    result = fxcompress.sweep(SPECS, ["default"], log=log, progress=False)
    assert (result.ran, result.skipped) == (1, 1)
    assert [r["status"] for r in TrialLog(log).read().values()] == ["ok", "ok"]


def test_crashing_and_memory_hungry_models_are_records_and_the_rest_finish(tmp_path):
    log = tmp_path / "sweep.jsonl"
    specs = [BAD + "crashing_model", BAD + "hungry_model", SPECS[0]]
    result = fxcompress.sweep(specs, ["default"], log=log, workers=2, progress=False,
                              options=fxcompress.SweepOptions(memory_gb=6, time_limit=300))
    statuses = {r["spec"]: r["status"] for r in result.records}
    assert statuses == {BAD + "crashing_model": "crashed", BAD + "hungry_model": "out_of_memory", SPECS[0]: "ok"}, result.records
    assert {r["key"] for r in _lines(log)} == {r["key"] for r in result.records}  # every finished trial is logged
    table = result.markdown()
    assert "crashed: the trial's process died from signal SIGSEGV" in table and "out_of_memory" in table


def test_sequential_and_processes_give_the_same_records(tmp_path):
    sequential = fxcompress.sweep(SPECS, ["default", "fp16"], log=tmp_path / "a.jsonl", progress=False)
    processes = fxcompress.sweep(SPECS, ["default", "fp16"], log=tmp_path / "b.jsonl", workers=2, progress=False)
    assert [_measured(r) for r in sequential.records] == [_measured(r) for r in processes.records]
    assert {r["executor"] for r in processes.records} == {"processes"} and all(r["peak_rss_mb"] > 0 for r in processes.records)


@pytest.mark.parametrize("specs, words", [
    (["no-such-model"], "Cannot tell what model the sweep spec 'no-such-model' names"),
    ([], "no trials"),
])
def test_unknown_specs_are_clear_errors_before_any_trial(tmp_path, specs, words):
    with pytest.raises(InputError, match=words):
        fxcompress.sweep(specs, ["default"], log=tmp_path / "s.jsonl", progress=False)
    assert not (tmp_path / "s.jsonl").exists()


def test_bad_table_name_and_missing_spec_file_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match=r"options object now.*Fix: pass options=fxcompress.SweepOptions\(memory_gb=6\)"):
        fxcompress.sweep(SPECS, memory_gb=6, progress=False)
    with pytest.raises(InputError, match="options must be a fxcompress.SweepOptions"):
        fxcompress.sweep(SPECS, options={"memory_gb": 6}, progress=False)
    with pytest.raises(InputError, match="end the table's name in .md or .html"):
        fxcompress.sweep(SPECS, table=tmp_path / "t.txt", progress=False)
    with pytest.raises(InputError, match="does not exist"):
        fxcompress.sweep(tmp_path / "missing.txt", progress=False)


def test_cli_sweep_spec_file_resume_and_errors(tmp_path, capsys):
    specs = tmp_path / "specs.txt"
    specs.write_text(f"# the tiny zoo\n{SPECS[0]}\n\n{SPECS[1]}  # keyword inputs\n")
    log, table = tmp_path / "s.jsonl", tmp_path / "s.md"
    assert main(["sweep", "--specs-file", str(specs), "--log", str(log), "--table", str(table), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 trials: 2 ok" in out and "Ran 2 trial(s) (processes)" in out and f"Wrote {table}" in out
    assert main(["sweep", "--specs-file", str(specs), "--log", str(log)]) == 0
    assert "Ran 0 trial(s) (sequential), skipped 2" in capsys.readouterr().out
    assert main(["sweep", "bogus", "--log", str(log)]) == 2
    assert "Cannot tell what model the sweep spec 'bogus' names" in capsys.readouterr().err
    assert main(["sweep", "--log", str(log)]) == 2
    assert "no model specs" in capsys.readouterr().err
