"""The Ray executor against real Ray: a local instance, a two-node cluster started here with
`ray start`, and an unreachable address. Skipped (with the reason) only where Ray cannot start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fxcompress
from fxcompress.errors import InputError
from fxcompress.sweeps.executor import RayExecutor, Task
from tests.sweeps.test_sweep import SPECS, _measured

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'fxcompress[ray]' (the test extra has it)")
RAY_CLI = Path(sys.executable).with_name("ray")
FN = "tests.sweeps.trial_functions:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([str(RAY_CLI), *args], capture_output=True, text=True, timeout=180, env=env)


def test_local_ray_sweep_matches_sequential(tmp_path):
    sequential = fxcompress.sweep(SPECS, ["default"], log=tmp_path / "a.jsonl", progress=False)
    try:
        on_ray = fxcompress.sweep(SPECS, ["default"], log=tmp_path / "b.jsonl", progress=False,
                                  options=fxcompress.SweepOptions(ray="auto", ray_cpus=2, memory_gb=6, time_limit=600))
    except Exception as exc:  # noqa: BLE001 - only a Ray that cannot start here is a skip
        if ray.is_initialized():
            raise
        pytest.skip(f"a local Ray instance could not start here: {type(exc).__name__}: {exc}")
    assert not ray.is_initialized()  # the sweep shut down the instance it started
    assert [_measured(r) for r in on_ray.records] == [_measured(r) for r in sequential.records]
    assert {r["executor"] for r in on_ray.records} == {"ray"} and all(r["node"] for r in on_ray.records)


def test_local_ray_records_a_crash_and_finishes_the_rest():
    with RayExecutor("auto", num_cpus=2, memory_gb=6, time_limit=120) as executor:
        records = executor.map([Task("segv", FN + "segfault"), Task("ok", FN + "echo", (3,)),
                                Task("oom", FN + "hungry"), Task("raise", FN + "raising")])
    assert [r["status"] for r in records] == ["crashed", "ok", "out_of_memory", "error"], records
    assert records[1]["value"] == 3


@pytest.fixture
def two_node_cluster():
    """A head and a second node, one CPU each, started on this machine with `ray start`."""
    if not RAY_CLI.exists():
        pytest.skip("the `ray` command is not installed next to this Python")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = _ray_cli("start", "--head", f"--port={port}", "--num-cpus=1", "--object-store-memory=100000000",
                    "--include-dashboard=false", "--disable-usage-stats")
    if head.returncode != 0:
        pytest.skip(f"`ray start --head` failed here: {head.stderr[-500:]}")
    try:
        worker = _ray_cli("start", f"--address={address}", "--num-cpus=1", "--object-store-memory=100000000",
                          "--disable-usage-stats")
        if worker.returncode != 0:
            pytest.skip(f"`ray start --address` failed here: {worker.stderr[-500:]}")
        yield address
    finally:
        _ray_cli("stop", "--force")


def test_two_node_cluster_runs_trials_on_both_nodes(two_node_cluster):
    with RayExecutor(two_node_cluster, memory_gb=6, time_limit=300) as executor:
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(1)
        assert executor.node_cpus() == 1
        # Four one-CPU trials on two one-CPU nodes: both nodes must take some.
        records = executor.map([Task(f"t{i}", FN + "timed", (3.0,)) for i in range(4)])
        bench = executor.map([Task("b", FN + "timed", (0.5,), exclusive=True)])
    assert all(r["status"] == "ok" for r in records + bench), records + bench
    assert len({r["node"] for r in records}) == 2
    assert not ray.is_initialized()


def test_sweep_on_the_two_node_cluster(two_node_cluster, tmp_path):
    result = fxcompress.sweep(SPECS, ["default"], log=tmp_path / "c.jsonl", progress=False,
                              options=fxcompress.SweepOptions(ray=two_node_cluster))
    assert [r["status"] for r in result.records] == ["ok", "ok"], result.records


def test_unreachable_ray_address_is_a_clear_error_and_quick(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    with pytest.raises(InputError, match=f"No Ray cluster answers at {address}"):
        fxcompress.sweep(SPECS, ["default"], log=tmp_path / "s.jsonl", progress=False,
                         options=fxcompress.SweepOptions(ray=address))
    assert time.perf_counter() - start < 30 and not (tmp_path / "s.jsonl").exists()
    with pytest.raises(InputError, match="is not HOST:PORT"):
        RayExecutor("somewhere")


def test_ray_map_calls_runs_closures_on_workers():
    offset = 10
    with RayExecutor("auto", num_cpus=2) as executor:
        assert executor.map_calls(lambda i: i + offset, [1, 2, 3]) == [11, 12, 13]


@pytest.mark.parametrize("recipe", ["int8", "int8-dynamic"])
def test_int8_search_trials_run_on_ray_workers_and_choose_the_same(recipe):
    """quantize-int8's and quantize-int8-dynamic's per-layer trials ship to Ray workers; the
    sensitivities, metric trials and float layers equal the in-process search's."""
    from tests.sweeps.test_search_executor import _search

    here = _search(recipe)
    with RayExecutor("auto", num_cpus=2) as executor:
        remote = _search(recipe, options=fxcompress.CompileOptions(executor=executor))
    assert [(l["name"], l["precision"], l.get("reason")) for l in remote["layers"]] == \
        [(l["name"], l["precision"], l.get("reason")) for l in here["layers"]]
    for there, local in zip(remote["layers"], here["layers"]):  # int8-dynamic reports no per-layer sensitivity
        assert there.get("sensitivity") == (None if local.get("sensitivity") is None
                                            else pytest.approx(local["sensitivity"], rel=1e-5))
    assert [t["float_layers"] for t in remote["metric_trials"]] == [t["float_layers"] for t in here["metric_trials"]]
    # static int8 has five layers to rank and bisects; dynamic int8 quantizes the one Linear only
    assert len(remote["metric_trials"]) >= (2 if recipe == "int8" else 1)