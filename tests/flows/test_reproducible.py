"""The data stages are reproducible: two fresh homes build the micro recipe's data with the same
fingerprints, and a crawl run again (`--refresh crawl`) rebuilds nothing after it.

Every fingerprint after the crawl hashes the bytes of its inputs (storage/artifacts.content_hash),
so this fails as soon as a crawl's pages differ between two runs: other pages, other bytes, or
only another fetched_at.
"""
from __future__ import annotations

import json

import pytest

from flows.cli import main as cli
from flows.recipe import load_recipe

pytestmark = pytest.mark.slow

DATA_STAGES = ["crawl", "extract", "dedupe", "filter", "tokenizer"]


def fingerprints(home, capsys) -> dict[str, str]:
    capsys.readouterr()
    assert cli(["status", "--json", "--recipe", "micro", "--home", str(home)]) == 0
    doc = json.loads(capsys.readouterr().out)
    return {s["stage"]: s["fingerprint"] for s in doc["stages"] if s["state"] == "published"}


def test_two_fresh_homes_build_the_same_data(tmp_path, prefect_server, capsys):
    from flows.family import family_flow

    assert load_recipe("micro").ancestors("tokenizer") == DATA_STAGES
    homes = [tmp_path / "a", tmp_path / "b"]
    for home in homes:
        report = family_flow(recipe="micro", home=str(home), until="tokenizer", track=False)
        assert {s: r["status"] for s, r in report["stages"].items()} == {s: "built" for s in DATA_STAGES}
    first, second = (fingerprints(h, capsys) for h in homes)
    assert set(first) == set(DATA_STAGES) and first == second

    # the nightly `family run --refresh crawl`: the pydoc pages come out byte-identical, so
    # every stage after the crawl is reused (early cutoff)
    report = family_flow(recipe="micro", home=str(homes[0]), until="tokenizer", refresh=["crawl"], track=False)
    assert {s: r["status"] for s, r in report["stages"].items()} == {"crawl": "built", **{s: "reused" for s in DATA_STAGES[1:]}}
    assert fingerprints(homes[0], capsys) == first
