"""stages/text/workers.py: the data stages' pools never fork the (threaded) process they run in."""
from __future__ import annotations

import threading

from stages.text.workers import worker_pool

LOCK = threading.Lock()  # a lock some thread of the stage's process holds while a pool starts


def _double_under_lock(x: int) -> int:
    with LOCK:
        return 2 * x


def test_workers_do_not_inherit_a_lock_held_when_the_pool_starts():
    """With fork, each worker would start with LOCK held by a thread it does not have and wait on it
    forever (the hang of a fork inside Prefect's threads); forked from the forkserver, it starts clean."""
    with LOCK:
        with worker_pool(2) as pool:
            assert pool.map_async(_double_under_lock, range(8)).get(timeout=120) == [2 * i for i in range(8)]


def test_workers_start_with_the_language_identifier_loaded():
    """The forkserver imported stages/text/preload.py: a worker finds the model already loaded."""
    with worker_pool(1) as pool:
        assert pool.apply_async(_identifier_cached).get(timeout=120) is True


def _identifier_cached() -> bool:
    from stages.extract import language_identifier
    return language_identifier.cache_info().currsize == 1
