"""Declared pyarrow schemas, one per dataset kind (see DESIGN.md, "Data").

Every Parquet file the pipeline writes carries one of these; `storage.parquet.write_table` refuses
a table that does not match, and `read_table` names the file and the missing or mistyped column.
"""
from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

PAGES = pa.schema(
    [
        ("url", pa.string()),
        ("final_url", pa.string()),
        ("status", pa.int32()),
        ("content_type", pa.string()),
        ("fetched_at", pa.timestamp("ms", tz="UTC")),
        ("body", pa.binary()),
        ("sha256", pa.string()),
    ]
)

DOCS = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("source", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("lang", pa.string()),
        ("lang_score", pa.float32()),
        ("n_chars", pa.int64()),
        ("n_words", pa.int64()),
        ("sha256", pa.string()),
        ("cluster", pa.string()),
    ]
)

# documents (or pages) a step dropped, with the step's reason: the audit trail of the funnel
EXCLUDED = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("n_chars", pa.int64()),
        ("text", pa.string()),
    ]
)

CHAT = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES),
        ("task", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),  # "train", "val" (tuning) or "test" (reported only): see stages/instruct.py
        ("key", pa.string()),  # equivalence key: rows of one problem ("expr:47+58", "string:python") share it and a split
    ]
)

PREFS = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("task", pa.string()),  # not in DESIGN's schema: per-task reward/DPO accuracy needs it (null for imports)
        ("source", pa.string()),
        ("split", pa.string()),
        ("key", pa.string()),
        # how rejected was made (null for imports): "near_miss", the right work with a wrong result;
        # "slip", a slip inside the work that every later step follows (reward/DPO report accuracy per kind)
        ("kind", pa.string()),
    ]
)

PROMPTS = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", MESSAGES),
        ("answer", pa.string()),
        ("verifier", pa.string()),
        ("task", pa.string()),
        ("source", pa.string()),
        # "train": what GRPO practises on (for generated tasks: RL problems not in `chat`, stages/instruct.py);
        # "val": the held-out prompts every chat stage is scored on; "test": reported only, never read by a trainer
        ("split", pa.string()),
        ("key", pa.string()),
    ]
)

# retrieval (stages/retrieval.py): the corpus chunked by meaning, one row per passage; `split` is its
# page's split (train pages give training pairs; every split is searched)
PASSAGES = pa.schema(
    [
        ("id", pa.string()),
        ("doc_id", pa.string()),
        ("url", pa.string()),  # the page URL with the passage's anchor ("...json.html#-dumps")
        ("title", pa.string()),  # "json.dumps", "json: Pretty printing"
        ("text", pa.string()),
        ("kind", pa.string()),  # module | section | function | class
        ("split", pa.string()),
    ]
)

# one row per query: its positive passage and mined hard negatives as passage ids (the text is in
# `passages`), how it was made (`kind`) and its word overlap with the positive
PAIRS = pa.schema(
    [
        ("id", pa.string()),
        ("query", pa.string()),
        ("kind", pa.string()),
        ("positive", pa.string()),
        ("negatives", pa.list_(pa.string())),
        ("overlap", pa.float32()),
        ("split", pa.string()),
    ]
)

QRELS = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("relevance", pa.int32())])

IMAGES = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("messages", MESSAGES),
        ("answer", pa.string()),
        ("task", pa.string()),
        ("split", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "pages": PAGES,
    "docs": DOCS,
    "excluded": EXCLUDED,
    "chat": CHAT,
    "prefs": PREFS,
    "prompts": PROMPTS,
    "passages": PASSAGES,
    "pairs": PAIRS,
    "qrels": QRELS,
    "images": IMAGES,
}
