"""The data stages on Dask: prefect-dask's task runner on a distributed LocalCluster of 2 workers.

The micro recipe's data stages (crawl of pydoc pages, extract, dedupe, filter, tokenizer) run twice
in two homes, in process and with `runner: dask`; small tasks make each stage map several shards.
Every output is the same bytes, every fingerprint the same (where a stage computes is no part of
what it computes), and each shard was a Prefect task run of the flow run.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.processes import free_port
from flows.recipe import RecipeError, load_recipe
from stages.contract import StageError
from storage.artifacts import ArtifactStore
from storage.home import Home

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]

DATA_STAGES = ("crawl", "extract", "dedupe", "filter", "tokenizer")
SMALL_TASKS = ["extract.pages_per_task=4", "dedupe.docs_per_task=4"]


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


def test_data_stages_on_dask_write_the_same_bytes_as_in_process(tmp_path, prefect_server):
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


def test_an_unreachable_scheduler_is_one_line_naming_its_address(tmp_path, prefect_server):
    from flows.family import family_flow

    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(StageError) as e:
        family_flow(recipe="micro", overrides=[f"runner={{dask: '{address}'}}"], home=str(tmp_path / "home"),
                    until="crawl", track=False)
    assert address in str(e.value) and "\n" not in str(e.value)
