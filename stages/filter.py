"""Filter documents by language, quality, repetition and a word list, then scrub PII.

What: reads `docs_dedup` (schema `docs`), runs each document through the filters named in
`Config.filters`, in order, and writes the survivors to `docs_clean` (schema `docs`, with n_chars,
n_words and sha256 recomputed after rewriting) and every dropped document to `excluded` (schema
`excluded`: stage "filter", the reason "<filter>:<rule>", what was measured, the text as it came in).
The funnel (documents and bytes left after each filter) and the drops per reason come back as tables.

The filters (stages/quality/, one object per paper, thresholds as keyword defaults):
- language: keep `languages` at score >= 0.65 (FineWeb, DCLM).
- gopher_repetition, gopher_quality: Rae et al. 2021, App. A.1.1 (datatrove defaults).
- c4: Raffel et al. 2020 §2.2 line and document rules, with the terminal-punctuation rule off as in
  FineWeb.
- fineweb: Penedo et al. 2024 §3.3, the three extra rules plus datatrove's list ratio.
- blocklist: the C4 bad-words rule with a word-list file.
- pii: e-mail, public IP and phone placeholders (a modifier, never a drop).
The order follows FineWeb's pipeline (language, repetition, quality, C4, FineWeb), with the word list
and PII last, as C4 and FineWeb do. Config defaults are the papers' values; they are written for web
text and drop most code-heavy documentation, so recipes for such corpora relax them (0 turns a rule
off, or leave a filter out of `filters`).

Execution: with enough documents (MIN_DOCS_PER_WORKER each) they are filtered in `workers`
processes, in batches; this process writes the results in input order, so `docs_clean` keeps the
order of `docs_dedup` whatever the number of workers.

Run:
    python -m stages.filter --config c.json --inputs i.json --run-dir DIR
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stages.contract import StageContext, StageError, StageResult, main
from stages.quality import DocFilter
from stages.quality.blocklist import DEFAULT_LIST, BlocklistFilter, read_word_list
from stages.quality.c4 import C4QualityFilter
from stages.quality.fineweb import FineWebQualityFilter
from stages.quality.gopher import GopherQualityFilter, GopherRepetitionFilter
from stages.quality.language import LanguageFilter
from stages.quality.pii import PLACEHOLDERS, PIIScrubber
from stages.text.workers import worker_pool
from storage import parquet
from storage.artifacts import Artifact
from storage.schemas import DOCS

INPUTS = ("docs_dedup",)
OUTPUTS = ("docs_clean", "excluded")
INPUT_FILES = ("blocklist_path",)  # the word list's content is part of the fingerprint

FILTERS = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "blocklist", "pii")
BATCH_DOCS = 64  # documents per task sent to a worker: big enough to amortise pickling
MIN_DOCS_PER_WORKER = 200  # below this, starting processes costs more than it saves
MAP_DOCS = 512  # documents per task under ctx.mapper: a Prefect task run costs more than a pool's task


@dataclass(frozen=True)
class Config:
    filters: tuple[str, ...] = FILTERS  # which filters run, in this order
    # language (FineWeb / DCLM)
    languages: tuple[str, ...] = ("en",)  # empty: any language
    language_min_score: float = 0.65
    # Gopher repetition (Rae et al. 2021, Table A1)
    gopher_dup_line_frac: float = 0.3
    gopher_dup_para_frac: float = 0.3
    gopher_dup_line_char_frac: float = 0.2
    gopher_dup_para_char_frac: float = 0.2
    gopher_top_ngrams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    gopher_dup_ngrams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    # Gopher quality
    gopher_min_words: int = 50
    gopher_max_words: int = 100_000
    gopher_min_avg_word_length: float = 3.0
    gopher_max_avg_word_length: float = 10.0
    gopher_max_symbol_word_ratio: float = 0.1
    gopher_max_bullet_lines_ratio: float = 0.9
    gopher_max_ellipsis_lines_ratio: float = 0.3
    gopher_min_alpha_words_ratio: float = 0.8
    gopher_min_stop_words: int = 2
    # C4 (FineWeb's settings: no terminal-punctuation rule)
    c4_remove_citations: bool = True
    c4_terminal_punct: bool = False
    c4_min_sentences: int = 5
    c4_min_words_per_line: int = 3
    c4_max_word_length: int = 1000
    c4_lorem_ipsum: bool = True
    c4_javascript: bool = True
    c4_curly_bracket: bool = True
    c4_policy: bool = True
    # FineWeb
    fineweb_line_punct_ratio: float = 0.12
    fineweb_line_punct_exclude_zero: bool = False
    fineweb_short_line_ratio: float = 0.67
    fineweb_short_line_length: int = 30
    fineweb_char_dup_ratio: float = 0.01
    fineweb_list_ratio: float = 0.3
    # word list: "" is the short default list shipped in stages/quality/blocklist_en.txt
    blocklist_path: str = ""
    # PII kinds to replace: email, ip, phone
    pii_kinds: tuple[str, ...] = ("email", "ip", "phone")
    # execution
    workers: int = 2
    rows_per_shard: int = 50_000

    def validate(self) -> None:
        unknown = [f for f in self.filters if f not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filters {unknown} in filters (known: {', '.join(FILTERS)})")
        bad_kinds = [k for k in self.pii_kinds if k not in PLACEHOLDERS]
        if bad_kinds:
            raise ValueError(f"unknown pii_kinds {bad_kinds} (known: {', '.join(PLACEHOLDERS)})")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


# The Config field that relaxes each reason, for the "no documents left" message.
RELAX_FIELD = {
    "language:low_score": "language_min_score",
    "gopher_repetition:dup_line_frac": "gopher_dup_line_frac",
    "gopher_repetition:dup_para_frac": "gopher_dup_para_frac",
    "gopher_repetition:dup_line_char_frac": "gopher_dup_line_char_frac",
    "gopher_repetition:dup_para_char_frac": "gopher_dup_para_char_frac",
    "gopher_quality:min_words": "gopher_min_words",
    "gopher_quality:max_words": "gopher_max_words",
    "gopher_quality:min_avg_word_length": "gopher_min_avg_word_length",
    "gopher_quality:max_avg_word_length": "gopher_max_avg_word_length",
    "gopher_quality:symbol_word_ratio": "gopher_max_symbol_word_ratio",
    "gopher_quality:bullet_lines_ratio": "gopher_max_bullet_lines_ratio",
    "gopher_quality:ellipsis_lines_ratio": "gopher_max_ellipsis_lines_ratio",
    "gopher_quality:alpha_words_ratio": "gopher_min_alpha_words_ratio",
    "gopher_quality:stop_words": "gopher_min_stop_words",
    "c4:lorem_ipsum": "c4_lorem_ipsum",
    "c4:curly_bracket": "c4_curly_bracket",
    "c4:min_sentences": "c4_min_sentences",
    "c4:no_lines_left": "c4_min_words_per_line",
    "fineweb:line_punct_ratio": "fineweb_line_punct_ratio",
    "fineweb:short_line_ratio": "fineweb_short_line_ratio",
    "fineweb:char_dup_ratio": "fineweb_char_dup_ratio",
    "fineweb:list_ratio": "fineweb_list_ratio",
    "blocklist": "blocklist_path",
}


def relax_field(reason: str) -> str:
    """The Config field to change when `reason` removes too much."""
    if reason in RELAX_FIELD:
        return RELAX_FIELD[reason]
    if reason.startswith("language:"):
        return "languages"
    if reason.startswith("gopher_repetition:top_"):
        return "gopher_top_ngrams"
    if reason.startswith("gopher_repetition:dup_"):
        return "gopher_dup_ngrams"
    return "filters"


def build_filters(cfg: Config) -> list[DocFilter]:
    """The filter objects named in cfg.filters, in order, with cfg's thresholds."""
    blocklist = Path(cfg.blocklist_path) if cfg.blocklist_path else DEFAULT_LIST
    make = {
        "language": lambda: LanguageFilter(cfg.languages, cfg.language_min_score),
        "gopher_repetition": lambda: GopherRepetitionFilter(
            dup_line_frac=cfg.gopher_dup_line_frac,
            dup_para_frac=cfg.gopher_dup_para_frac,
            dup_line_char_frac=cfg.gopher_dup_line_char_frac,
            dup_para_char_frac=cfg.gopher_dup_para_char_frac,
            top_ngrams=cfg.gopher_top_ngrams,
            dup_ngrams=cfg.gopher_dup_ngrams,
        ),
        "gopher_quality": lambda: GopherQualityFilter(
            min_words=cfg.gopher_min_words,
            max_words=cfg.gopher_max_words,
            min_avg_word_length=cfg.gopher_min_avg_word_length,
            max_avg_word_length=cfg.gopher_max_avg_word_length,
            max_symbol_word_ratio=cfg.gopher_max_symbol_word_ratio,
            max_bullet_lines_ratio=cfg.gopher_max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=cfg.gopher_max_ellipsis_lines_ratio,
            min_alpha_words_ratio=cfg.gopher_min_alpha_words_ratio,
            min_stop_words=cfg.gopher_min_stop_words,
        ),
        "c4": lambda: C4QualityFilter(
            remove_citations=cfg.c4_remove_citations,
            terminal_punct=cfg.c4_terminal_punct,
            min_sentences=cfg.c4_min_sentences,
            min_words_per_line=cfg.c4_min_words_per_line,
            max_word_length=cfg.c4_max_word_length,
            lorem_ipsum=cfg.c4_lorem_ipsum,
            javascript=cfg.c4_javascript,
            curly_bracket=cfg.c4_curly_bracket,
            policy=cfg.c4_policy,
        ),
        "fineweb": lambda: FineWebQualityFilter(
            line_punct_ratio=cfg.fineweb_line_punct_ratio,
            line_punct_exclude_zero=cfg.fineweb_line_punct_exclude_zero,
            short_line_ratio=cfg.fineweb_short_line_ratio,
            short_line_length=cfg.fineweb_short_line_length,
            char_dup_ratio=cfg.fineweb_char_dup_ratio,
            list_ratio=cfg.fineweb_list_ratio,
        ),
        "blocklist": lambda: BlocklistFilter(read_word_list(blocklist)),
        "pii": lambda: PIIScrubber(cfg.pii_kinds),
    }
    try:
        return [make[name]() for name in cfg.filters]
    except (OSError, UnicodeDecodeError) as e:
        raise StageError(f"filter: cannot read the word list {blocklist}: {e}; set filter.blocklist_path to a UTF-8 file, one word per line") from None


def run_filters(doc: dict, filters: list[DocFilter]) -> dict[str, Any]:
    """Run one document through the filters, stopping at the first drop.

    Returns {"row" (a `docs` row if kept, an `excluded` row with the text as it came in if dropped),
    "reason" (None if kept), "bytes_in", "sizes" (UTF-8 bytes of the text after each filter it
    passed), "stats" (counters the filters added)}.
    """
    text_in = doc["text"]
    size = bytes_in = len(text_in.encode())
    sizes: list[int] = []
    for f in filters:
        before = doc["text"]
        verdict = f.filter(doc)
        if verdict is not True:
            _, reason, *detail = verdict
            row = {"id": doc["id"], "url": doc.get("url"), "stage": "filter", "reason": reason,
                   "detail": detail[0] if detail else "", "n_chars": len(text_in), "text": text_in}
            return {"row": row, "reason": reason, "bytes_in": bytes_in, "sizes": sizes, "stats": doc.get("stats", {})}
        if doc["text"] is not before:
            size = len(doc["text"].encode())
        sizes.append(size)
    return {"row": clean_row(doc), "reason": None, "bytes_in": bytes_in, "sizes": sizes, "stats": doc.get("stats", {})}


def clean_row(doc: dict) -> dict:
    """A `docs` row with the sizes and hash of the (possibly rewritten) text."""
    text = doc["text"]
    row = {name: doc.get(name) for name in DOCS.names}
    row.update(n_chars=len(text), n_words=len(text.split()), sha256=hashlib.sha256(text.encode()).hexdigest())
    return row


_worker_filters: list[DocFilter] = []


def _init_worker(cfg: Config) -> None:
    global _worker_filters
    _worker_filters = build_filters(cfg)


def _filter_batch(docs: list[dict]) -> list[dict[str, Any]]:
    return [run_filters(d, _worker_filters) for d in docs]


_worker_cfg: Config | None = None


def _filter_task(args: tuple[list[dict], Config]) -> list[dict[str, Any]]:
    """One batch on a worker of ctx.mapper, which has no pool initializer: the filters are built once per config."""
    global _worker_cfg
    docs, cfg = args
    if _worker_cfg != cfg:
        _init_worker(cfg)
        _worker_cfg = cfg
    return _filter_batch(docs)


def batches(path: str, size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in parquet.iter_rows(path, batch_size=1024):
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup
    src = inputs["docs_dedup"].path
    try:
        parquet.check_schema(src, "docs")
        n_in = parquet.count_rows(src)
    except (parquet.SchemaError, FileNotFoundError) as e:
        raise StageError(f"filter: unreadable docs_dedup at {src}: {e}; rebuild the dedupe stage") from None
    if n_in == 0:
        raise StageError(f"filter: no documents in docs_dedup at {src}; check the extract and dedupe stages")
    filters = build_filters(cfg)  # here too, so that a bad word list fails before any worker starts
    workers = min(cfg.workers, max(1, n_in // MIN_DOCS_PER_WORKER)) if ctx.mapper is None else 1

    # loop: workers filter, this process counts and writes in input order
    out_clean, out_excluded = ctx.output("docs_clean"), ctx.output("excluded")
    passed = [0] * len(filters)  # documents left after filter i
    passed_bytes = [0] * len(filters)
    drops: dict[str, list[int]] = {}  # reason -> [documents, bytes]
    stats: dict[str, int] = {}
    bytes_in = done = kept = bytes_kept = 0
    t0 = time.perf_counter()
    # not a fork of this process: the stage may run in a threaded Prefect worker (stages/text/workers.py)
    pool = worker_pool(workers, _init_worker, (cfg,)) if workers > 1 else None
    try:
        with parquet.ShardWriter(out_clean, "docs", cfg.rows_per_shard) as clean, \
                parquet.ShardWriter(out_excluded, "excluded", cfg.rows_per_shard) as excluded:
            chunks = batches(src, BATCH_DOCS)
            if ctx.mapper is not None:
                results = ctx.mapper(_filter_task, [(chunk, cfg) for chunk in batches(src, MAP_DOCS)])
            elif pool is not None:
                results = pool.imap(_filter_batch, chunks)
            else:
                results = ([run_filters(d, filters) for d in chunk] for chunk in chunks)
            for batch in results:
                for r in batch:
                    bytes_in += r["bytes_in"]
                    for i, size in enumerate(r["sizes"]):
                        passed[i] += 1
                        passed_bytes[i] += size
                    for key, n in r["stats"].items():
                        stats[key] = stats.get(key, 0) + n
                    if r["reason"] is None:
                        clean.write(r["row"])
                        kept += 1
                        bytes_kept += r["sizes"][-1] if r["sizes"] else r["bytes_in"]
                    else:
                        d = drops.setdefault(r["reason"], [0, 0])
                        d[0] += 1
                        d[1] += r["bytes_in"]
                        excluded.write(r["row"])
                done += len(batch)
                ctx.progress(done, n_in, "documents", kept_frac=kept / done)
    finally:
        if pool is not None:
            pool.terminate()
    elapsed = time.perf_counter() - t0

    if kept == 0:
        for out in (out_clean, out_excluded):
            shutil.rmtree(out, ignore_errors=True)
        reason, (n, _) = max(drops.items(), key=lambda kv: kv[1][0])
        raise StageError(f"filter: no documents left: {reason} removed {n} of {n_in}; relax filter.{relax_field(reason)}")

    # save: tables, metrics, summary
    funnel = [{"step": "docs_dedup", "docs": n_in, "bytes": bytes_in, "dropped": 0}]
    left = n_in
    for f, n, b in zip(filters, passed, passed_bytes):
        funnel.append({"step": f.name, "docs": n, "bytes": b, "dropped": left - n})
        left = n
    drop_rows = [{"reason": r, "docs": n, "bytes": b, "frac": n / n_in}
                 for r, (n, b) in sorted(drops.items(), key=lambda kv: -kv[1][0])]
    pii = sum(n for key, n in stats.items() if key.startswith("pii/"))
    metrics = {
        "docs_in": n_in,
        "docs_kept": kept,
        "kept_frac": kept / n_in,
        "bytes_in": bytes_in,
        "bytes_kept": bytes_kept,
        "pii_replacements": pii,
        "docs_per_s": n_in / max(elapsed, 1e-9),
        "workers_used": workers,
        **{f"dropped/{r}": n for r, (n, _) in drops.items()},
        **{key: n for key, n in stats.items()},
    }
    ctx.tracker.log_metrics(metrics)
    summary = "\n".join(
        [f"Kept {kept} of {n_in} documents ({kept / n_in:.1%}), {bytes_kept:,} of {bytes_in:,} bytes; "
         f"{pii} PII replacements; {n_in / max(elapsed, 1e-9):.0f} docs/s on {workers} process(es).", "",
         "| step | docs | bytes | dropped |", "|---|---:|---:|---:|"]
        + [f"| {r['step']} | {r['docs']} | {r['bytes']:,} | {r['dropped']} |" for r in funnel]
        + ["", "| reason | docs | bytes |", "|---|---:|---:|"]
        + [f"| {r['reason']} | {r['docs']} | {r['bytes']:,} |" for r in drop_rows]
    )
    return StageResult(
        outputs={
            "docs_clean": {"rows": kept, "bytes": bytes_kept},
            "excluded": {"rows": n_in - kept},
        },
        metrics=metrics,
        summary=summary,
        tables={"funnel": funnel, "drops": drop_rows},
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))
