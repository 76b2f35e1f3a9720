"""A DuckDB catalog over the home: every published Parquet dataset is a view.

The newest published artifact of each stage output becomes a view named after the output
(`docs_clean`, `excluded`, `chat`, ...); older ones stay reachable as `<output>__<fingerprint>`.
`family sql "select reason, count(*) from excluded group by 1"` runs against it.
"""
from __future__ import annotations

from pathlib import Path

import duckdb

from storage.artifacts import ArtifactStore
from storage.home import Home


def _parquet_glob(path: Path) -> str | None:
    if path.is_file() and path.suffix == ".parquet":
        return str(path)
    if path.is_dir() and any(path.rglob("*.parquet")):
        return str(path / "**" / "*.parquet")
    return None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def datasets(home: Home) -> dict[str, str]:
    """view name -> parquet glob, newest artifact of each output first."""
    store = ArtifactStore(home)
    views: dict[str, str] = {}
    for stage in store.stages():
        for i, pub in enumerate(store.history(stage)):
            for name, art in pub.artifacts().items():
                glob = _parquet_glob(Path(art.path))
                if glob is None:
                    continue
                if i == 0:
                    views.setdefault(name, glob)
                views[f"{name}__{pub.fingerprint}"] = glob
    return views


def connect(home: Home) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for view, glob in datasets(home).items():
        con.execute(f"create view {_quote(view)} as select * from read_parquet('{glob}', union_by_name=true)")
    return con
