"""The data stages' shards on Dask: prefect-dask's task runner, one Prefect task per shard.

A recipe's `runner:` picks where the data stages (extract, dedupe's MinHash signatures, filter, the
tokenizer's encoding) map their pure per-shard function:

    runner: local                          # default: each stage's own process pool
    runner: dask                           # a distributed.LocalCluster of 2 worker processes
    runner: {dask: {workers: 4}}           # ... of 4
    runner: {dask: tcp://10.0.0.5:8786}    # an existing scheduler (`dask scheduler` + `dask worker ADDRESS`)

The flow opens one `prefect_dask.DaskTaskRunner` for the whole run (`open_runner`); a stage task sets
`ctx.mapper` to a `DaskMapper`, which submits one `shard` task per item to that runner and gives the
results back in submission order, so the stage writes the same bytes as in process. Each shard is a
Prefect task run of the flow run (the UI shows them under the stage), computed on a Dask worker; the
stage still reads its inputs and writes its outputs in the flow's process, so a remote cluster's
workers need the project installed but not the home.

A shard that gives no result within FAMILY_SHARD_TIMEOUT_S seconds (default 3600) of the previous one
fails the stage, naming the shard, instead of waiting forever: a worker whose Prefect client keeps
retrying a server that went away, or a cluster that lost its workers, would otherwise hang the flow.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.recipe import RunnerSpec
from stages.contract import StageError


@task(name="shard", task_run_name="{stage}-{index}", cache_policy=NO_CACHE, persist_result=False)
def shard_task(stage: str, index: int, fn: Callable[[Any], Any], item: Any) -> Any:
    """fn(item) on a Dask worker: one shard of a data stage."""
    return fn(item)


_current: list[Any] = []  # the runner of the flow run in progress in this process (a stack: nested runs)


@contextlib.contextmanager
def open_runner(spec: RunnerSpec) -> Iterator[Any]:
    """The DaskTaskRunner of `spec`, started for the duration of a flow run (None for local)."""
    if spec.kind == "local":
        yield None
        return
    from prefect_dask import DaskTaskRunner

    if spec.address:
        runner = DaskTaskRunner(address=spec.address, client_kwargs={"timeout": "5s"})
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": spec.workers, "threads_per_worker": 1, "processes": True,
                                                "dashboard_address": None})
    runner.__enter__()
    try:
        runner.client  # noqa: B018 - connects (or starts the LocalCluster) now, not at the first shard
    except (OSError, TimeoutError) as e:
        runner.__exit__(None, None, None)
        raise StageError(f"runner: cannot reach the Dask scheduler at {spec.address or 'a new LocalCluster'} "
                         f"({type(e).__name__}: {str(e)[:160]}); start it (`dask scheduler`) or set runner: local") from None
    _current.append(runner)
    try:
        yield runner
    finally:
        _current.remove(runner)
        runner.__exit__(None, None, None)


ENV_TIMEOUT = "FAMILY_SHARD_TIMEOUT_S"


class DaskMapper:
    """ctx.mapper on the flow's Dask runner: one `shard` task per item, results in order."""

    def __init__(self, runner: Any, stage: str):
        self.runner, self.stage = runner, stage
        self.timeout_s = float(os.environ.get(ENV_TIMEOUT, "3600"))

    def __call__(self, fn: Callable[[Any], Any], items: list[Any]) -> Iterable[Any]:
        futures = [self.runner.submit(shard_task, {"stage": self.stage, "index": i, "fn": fn, "item": item})
                   for i, item in enumerate(items)]
        for i, f in enumerate(futures):
            try:
                yield f.result(timeout=self.timeout_s)
            except TimeoutError:
                raise StageError(f"{self.stage}: shard {self.stage}-{i} of {len(futures)} gave no result in "
                                 f"{self.timeout_s:g} s on the Dask cluster (workers lost, or the Prefect API "
                                 f"unreachable from them?); raise {ENV_TIMEOUT} if shards are this slow") from None


def mapper(stage: str) -> DaskMapper | None:
    """The mapper for a stage task of the flow run in progress, or None when it runs locally."""
    return DaskMapper(_current[-1], stage) if _current else None
