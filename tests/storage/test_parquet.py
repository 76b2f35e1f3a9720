"""storage/parquet.py: schema-checked, atomic Parquet files and shards."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import parquet
from storage.schemas import SCHEMAS

CHAT_ROW = {"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "task": "t", "source": "s", "split": "train", "key": None}


def chat_rows(n: int) -> list[dict]:
    return [{**CHAT_ROW, "id": f"r{i}", "split": "val" if i % 3 == 0 else "train"} for i in range(n)]


def test_write_read_round_trip_zstd(tmp_path):
    path = parquet.write_table(chat_rows(5), tmp_path / "chat.parquet", "chat")
    assert parquet.read_table(path, "chat").to_pylist() == chat_rows(5)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_rows_that_do_not_match_the_schema_name_it(tmp_path):
    with pytest.raises(parquet.SchemaError, match="chat schema"):
        parquet.write_table([{**CHAT_ROW, "messages": "not a list"}], tmp_path / "x.parquet", "chat")
    with pytest.raises(parquet.SchemaError, match="unknown dataset kind 'chats'"):
        parquet.write_table(chat_rows(1), tmp_path / "x.parquet", "chats")
    assert not (tmp_path / "x.parquet").exists()


def test_check_schema_names_the_file_and_column(tmp_path):
    bad = tmp_path / "d" / "part-00000.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"id": ["a"], "messages": [1]}), bad)
    with pytest.raises(parquet.SchemaError, match=r"part-00000.parquet: column 'messages' is int64"):
        parquet.check_schema(bad.parent, "chat")
    pq.write_table(pa.table({"id": ["a"]}), bad)
    with pytest.raises(parquet.SchemaError, match=r"missing column 'messages'"):
        parquet.read_table(bad.parent, "chat")


def test_shard_writer_splits_counts_and_iterates_in_order(tmp_path):
    with parquet.ShardWriter(tmp_path / "chat", "chat", rows_per_shard=4) as w:
        w.write_many(chat_rows(10))
    assert [f.name for f in parquet.files(tmp_path / "chat")] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert parquet.count_rows(tmp_path / "chat") == 10
    assert [r["id"] for r in parquet.iter_rows(tmp_path / "chat", columns=["id"], batch_size=3)] == [f"r{i}" for i in range(10)]


def test_an_empty_dataset_keeps_its_schema(tmp_path):
    n = parquet.ShardWriter(tmp_path / "prefs", "prefs").close()
    assert n == 0 and parquet.count_rows(tmp_path / "prefs") == 0
    assert parquet.read_table(tmp_path / "prefs", "prefs").schema.equals(SCHEMAS["prefs"], check_metadata=False)
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        parquet.files(tmp_path / "missing")
