"""The data stages on Dask: prefect-dask's task runner on a distributed LocalCluster of 2 workers.

The micro recipe's data stages (crawl of pydoc pages, extract, dedupe, filter, tokenizer) run twice
in two homes, in process and with `runner: dask`; small tasks make each stage map several shards.
Every output is the same bytes, every fingerprint the same (where a stage computes is no part of
what it computes), and each shard was a Prefect task run of the flow run.

Under a loaded machine these tests once sat 950 s and then failed with "Connection refused" from the
session's Prefect test server. `watchdog` makes such a run fail loudly and early instead: a shard
without a result in SHARD_TIMEOUT_S fails its stage (flows/dask_runner.ENV_TIMEOUT), and a test
server that is gone is named as the cause; pytest's faulthandler_timeout (pyproject.toml) dumps
every thread's stack to the terminal if a test still runs after 15 minutes. (A CI run once hung here
with no output and did not hang again in two reruns here. The likeliest cause, removed since: the
in-process run's extract and dedupe forked their worker pools inside Prefect's threads, where a child
can start with a lock held forever; they now fork from a forkserver, stages/text/workers.py.)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.dask_runner import ENV_TIMEOUT
from flows.processes import free_port
from flows.recipe import RecipeError, load_recipe
from stages.contract import StageError
from storage.artifacts import ArtifactStore
from storage.home import Home

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]

DATA_STAGES = ("crawl", "extract", "dedupe", "filter", "tokenizer")
SMALL_TASKS = ["extract.pages_per_task=4", "dedupe.docs_per_task=4"]
SHARD_TIMEOUT_S = 240  # alone, a whole flow here takes 10-30 s


def server_exit_code() -> int | None:
    """The exit code of the session's Prefect test server process, or None while it runs."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    proc = getattr(server, "server_process", None)
    return proc.poll() if proc is not None else None


@pytest.fixture
def watchdog(prefect_server, monkeypatch):
    monkeypatch.setenv(ENV_TIMEOUT, str(SHARD_TIMEOUT_S))
    assert server_exit_code() is None, f"the Prefect test server exited ({server_exit_code()}) before this test"
    try:
        yield
    finally:
        code = server_exit_code()
        assert code is None, f"the session's Prefect test server exited with code {code} during this test"


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def outputs(home: Home) -> dict[str, tuple[str, dict[str, bytes]]]:
    store = ArtifactStore(home)
    found = {}
    for stage in DATA_STAGES:
        pub = store.history(stage)[0]
        found[stage] = (pub.dir.name, {name: dir_bytes(Path(a.path)) if Path(a.path).is_dir() else {"": Path(a.path).read_bytes()}
                                       for name, a in pub.artifacts().items()})
    return found


def test_data_stages_on_dask_write_the_same_bytes_as_in_process(tmp_path, watchdog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.family import family_flow

    local, dask = Home(tmp_path / "local"), Home(tmp_path / "dask")
    family_flow(recipe="micro", overrides=SMALL_TASKS, home=str(local.root), until="tokenizer", track=False)
    report = family_flow(recipe="micro", overrides=[*SMALL_TASKS, "runner=dask"], home=str(dask.root), until="tokenizer",
                         track=False)
    assert {report["stages"][s]["status"] for s in DATA_STAGES} == {"built"}
    want, got = outputs(local), outputs(dask)
    for stage in DATA_STAGES:
        assert got[stage][0] == want[stage][0], f"{stage}: another fingerprint"
        assert got[stage][1] == want[stage][1], f"{stage}: other bytes"
    assert got["extract"][1]["docs"] and got["tokenizer"][1]["tokens"]["train.bin"]

    # each shard was a Prefect task run of the dask flow run, named after its stage
    with get_client(sync_client=True) as client:
        flow_run = max(client.read_flow_runs(), key=lambda r: r.created)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    shards = sorted(r.name for r in runs if r.name.split("-")[0] in DATA_STAGES and r.name.split("-")[-1].isdigit())
    for stage in ("extract", "dedupe", "filter", "tokenizer"):
        assert f"{stage}-0" in shards, shards
    assert "extract-1" in shards and "dedupe-1" in shards, "small tasks: several shards per stage"
    assert all(r.state_name == "Completed" for r in runs if r.name in shards)


def test_runner_values_are_validated_in_one_line(tmp_path):
    assert load_recipe("micro", ["runner=dask"]).runner.workers == 2
    assert load_recipe("micro", ["runner={dask: tcp://10.0.0.5:8786}"]).runner.address == "tcp://10.0.0.5:8786"
    with pytest.raises(RecipeError, match="runner must be local, dask"):
        load_recipe("micro", ["runner=ray"])
    with pytest.raises(RecipeError, match="workers must be an integer"):
        load_recipe("micro", ["runner={dask: {workers: 0}}"])


def test_an_unreachable_scheduler_is_one_line_naming_its_address(tmp_path, watchdog):
    from flows.family import family_flow

    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(StageError) as e:
        family_flow(recipe="micro", overrides=[f"runner={{dask: '{address}'}}"], home=str(tmp_path / "home"),
                    until="crawl", track=False)
    assert address in str(e.value) and "\n" not in str(e.value)


def test_a_shard_without_a_result_fails_its_stage_naming_it(monkeypatch):
    from flows.dask_runner import DaskMapper

    class Stuck:  # a future whose worker never answers
        def result(self, timeout=None):
            raise TimeoutError(f"did not complete within {timeout} seconds")

    class Runner:
        def submit(self, task, parameters):
            return Stuck()

    monkeypatch.setenv(ENV_TIMEOUT, "0.5")
    with pytest.raises(StageError, match=r"extract: shard extract-0 of 2 gave no result in 0.5 s") as e:
        list(DaskMapper(Runner(), "extract")(str, ["a", "b"]))
    assert ENV_TIMEOUT in str(e.value) and "\n" not in str(e.value)
