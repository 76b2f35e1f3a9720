"""Worker pools for the data stages that are safe inside a multi-threaded process.

The stages run in Prefect task threads (flows/family.py), beside Prefect's event-loop, API-client and
logging threads, and in a Dask-using or test process beside more. fork() there copies every lock as
some other thread holds it at that instant, and a child that then logs, allocates or imports can wait
on it forever, with the stage waiting forever on the child's result (CPython warns about fork in a
threaded process from 3.12 on; 3.14 makes forkserver the default). A forkserver is a fresh
single-threaded interpreter, started once per process: it imports PRELOAD (which loads the language
identifier and the normalisation tables: stages/text/preload.py), and every pool's workers are forked
from it, so they start with those loaded, as cheaply as a plain fork, and with no inherited locks.

    with worker_pool(2) as pool:            # or worker_pool(2, init, (cfg,)), as multiprocessing.Pool
        results = pool.imap(fn, items)      # fn and items must pickle: module-level functions
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
from typing import Any, Callable

PRELOAD = ["stages.text.preload"]


def worker_pool(workers: int, initializer: Callable[..., Any] | None = None,
                initargs: tuple[Any, ...] = ()) -> multiprocessing.pool.Pool:
    """A multiprocessing Pool of `workers` processes forked from this process's forkserver."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first pool of the process
    return ctx.Pool(workers, initializer, initargs)
