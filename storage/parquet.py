"""Parquet files with declared schemas: zstd, written atomically, checked on read.

A dataset is a directory of `part-*.parquet` shards (or a single file). Writers produce a whole
shard through a temporary name and `os.replace`, so a reader never sees half a file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.schemas import SCHEMAS


class SchemaError(ValueError):
    pass


def _schema(kind: str | pa.Schema) -> pa.Schema:
    if isinstance(kind, pa.Schema):
        return kind
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise SchemaError(f"unknown dataset kind {kind!r} (known: {', '.join(SCHEMAS)})") from None


def to_table(rows: list[dict[str, Any]], kind: str | pa.Schema) -> pa.Table:
    schema = _schema(kind)
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise SchemaError(f"rows do not match the {kind if isinstance(kind, str) else 'given'} schema: {e}") from None


def write_table(table: pa.Table | list[dict[str, Any]], path: str | Path, kind: str | pa.Schema) -> Path:
    """Write one Parquet file atomically, after checking it against the declared schema."""
    schema = _schema(kind)
    if not isinstance(table, pa.Table):
        table = to_table(table, kind)  # the kind, not the schema: its error then names the dataset kind
    elif not table.schema.equals(schema, check_metadata=False):
        try:
            table = table.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, KeyError, ValueError) as e:
            raise SchemaError(f"{path}: table does not match the {kind} schema: {e}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def files(path: str | Path) -> list[Path]:
    """The Parquet files of a dataset path (a file, or a directory of shards)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*.parquet") if not f.name.startswith("."))
    raise FileNotFoundError(f"no dataset at {p}")


def check_schema(path: str | Path, kind: str | pa.Schema) -> None:
    schema = _schema(kind)
    for f in files(path):
        got = pq.read_schema(f)
        for fld in schema:
            if fld.name not in got.names:
                raise SchemaError(f"{f}: missing column {fld.name!r} expected by the {kind} schema")
            if not got.field(fld.name).type.equals(fld.type):
                raise SchemaError(f"{f}: column {fld.name!r} is {got.field(fld.name).type}, expected {fld.type}")


def read_table(path: str | Path, kind: str | pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
    if kind is not None:
        check_schema(path, kind)
    fs = files(path)
    if not fs:
        schema = _schema(kind) if kind is not None else pa.schema([])
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    tables = [pq.read_table(f, columns=columns) for f in fs]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def iter_rows(path: str | Path, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    for f in files(path):
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def count_rows(path: str | Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files(path))


class ShardWriter:
    """Writes rows into numbered shards of at most `rows_per_shard` rows each."""

    def __init__(self, directory: str | Path, kind: str | pa.Schema, rows_per_shard: int = 50_000, prefix: str = "part"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.rows_per_shard = rows_per_shard
        self.prefix = prefix
        self.buf: list[dict[str, Any]] = []
        self.n_shards = 0
        self.n_rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self.buf.append(row)
        if len(self.buf) >= self.rows_per_shard:
            self.flush()

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.write(r)

    def flush(self) -> None:
        if not self.buf:
            return
        write_table(self.buf, self.dir / f"{self.prefix}-{self.n_shards:05d}.parquet", self.kind)
        self.n_rows += len(self.buf)
        self.n_shards += 1
        self.buf = []

    def close(self) -> int:
        self.flush()
        if self.n_shards == 0:  # an empty dataset is still a dataset with the right schema
            write_table(_schema(self.kind).empty_table(), self.dir / f"{self.prefix}-00000.parquet", self.kind)
            self.n_shards = 1
        return self.n_rows

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
