"""A dedupe index shared in Redis: two homes dedupe against one history, with the local index's results.

redis-server from Debian's package runs on 127.0.0.1 at a free port for this module. Home A dedupes
its documents; home B, with its own state folder, gets edited copies of A's documents plus new ones:
against the shared index it drops the copies as near-duplicates of A's documents, exactly as one
home with a local index that ran A's batch first does.
"""
from __future__ import annotations

import pytest

from stages import dedupe
from stages.contract import StageError
from tests.scaleout.servers import redis_server
from tests.stages.test_dedupe import SOURCES, doc, edit, run_dedupe, window

pytestmark = pytest.mark.scaleout


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def batches() -> tuple[list[dict], list[dict]]:
    home_a = [doc(f"https://a.example/{i}", window(name)) for i, name in enumerate(SOURCES[:5])]
    copies = [doc(f"https://b.example/copy{i}", edit(window(name), 40)) for i, name in enumerate(SOURCES[:3])]
    exact = [doc("https://b.example/exact", window(SOURCES[3]))]
    fresh = [doc(f"https://b.example/new{i}", window(name)) for i, name in enumerate(SOURCES[5:])]
    return home_a, copies + exact + fresh


def outcome(kept, excluded) -> tuple[list, list]:
    return (sorted((r["id"], r["cluster"]) for r in kept),
            sorted((r["id"], r["reason"], r["detail"]) for r in excluded.values()))


def test_a_second_home_drops_the_near_duplicates_of_the_first_homes_documents(tmp_path, redis_url, monkeypatch):
    home_a, home_b = batches()
    # one home with its local index: batch A, then batch B
    run_dedupe(tmp_path / "local", home_a)
    local_b = run_dedupe(tmp_path / "local", home_b)

    monkeypatch.setenv(dedupe.ENV_INDEX, redis_url)
    shared_a = run_dedupe(tmp_path / "home-a", home_a)
    result, kept, excluded = run_dedupe(tmp_path / "home-b", home_b)  # another state folder: only Redis is shared
    assert not (tmp_path / "home-b" / "state" / dedupe.INDEX_FILE).exists()

    a_ids = {d["id"] for d in home_a}
    near = [r for r in excluded.values() if r["reason"] == "near_duplicate"]
    assert len(near) == 3 and all(r["detail"] in a_ids for r in near), excluded
    assert excluded["https://b.example/exact"]["reason"] == "exact_duplicate"
    assert result.metrics["index_size"] == len(home_a) + 3  # the three new documents joined the history
    # the same documents kept and dropped, for the same reasons, as with the local index
    assert outcome(*shared_a[1:]) == outcome(*run_dedupe(tmp_path / "local-a-again", home_a)[1:])
    assert outcome(kept, excluded) == outcome(*local_b[1:])
    assert result.metrics == local_b[0].metrics


def test_a_rerun_carries_its_documents_and_a_changed_text_replaces_its_entry(tmp_path, redis_url, monkeypatch):
    monkeypatch.setenv(dedupe.ENV_INDEX, redis_url.replace("/0", "/1"))  # a database of its own
    docs = [doc(f"https://c.example/{i}", window(name)) for i, name in enumerate(SOURCES[:4])]
    run_dedupe(tmp_path / "first", docs)
    changed = [*docs[:3], {**doc(docs[3]["url"], window(SOURCES[6])), "id": docs[3]["id"]}]
    result, kept, excluded = run_dedupe(tmp_path / "second", changed)
    assert result.metrics["carried"] == 3 and len(kept) == 4 and not excluded
    assert result.metrics["index_size"] == 4
    # the old text of the replaced document is gone from the shared LSH: a copy of it is new again
    result, kept, _ = run_dedupe(tmp_path / "third", [doc("https://c.example/old-text", window(SOURCES[3]))])
    assert result.metrics["near_dups"] == 0 and result.metrics["exact_dups"] == 0 and len(kept) == 1


def test_an_unreachable_redis_url_is_one_line_naming_the_address(tmp_path, monkeypatch):
    from flows.processes import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv(dedupe.ENV_INDEX, url)
    with pytest.raises(StageError) as e:
        run_dedupe(tmp_path, batches()[0])
    assert url in str(e.value) and "\n" not in str(e.value)
