"""Deduplicate documents: same URL, same normalised text, and near-duplicates by MinHash LSH.

What: reads `docs` and writes `docs_dedup` (the documents kept, `cluster` = the id of their
cluster's representative) and `dedupe_excluded` (schema `excluded`, stage "dedupe") with the reason
and, as `detail`, the id of the kept document each dropped one duplicates.

How, in the order FineWeb and dolma apply them (cheapest and surest first):
1. URLs: `normalize_url` lowercases scheme and host, drops default ports, fragments, user info and
   tracking parameters (utm_*, gclid, fbclid, msclkid, mc_cid, mc_eid), sorts the query, and strips
   `index.html` and the trailing slash. A repeated normalised URL -> "duplicate_url".
2. Exact text: md5 of the normalised text (datatrove's `simplify_text`: lowercase, numbers -> 0,
   punctuation -> space, no diacritics, whitespace collapsed). DuckDB groups the (row, hash) table
   and joins it with the index's hashes; a repeat -> "exact_duplicate".
3. Near-duplicates: MinHash (Broder 1997) of word 5-gram shingles on the same normalised text,
   character 5-grams for CJK-dominant text, banded LSH (Indyk & Motwani 1998, datasketch
   `MinHashLSH`), every candidate pair verified by its exact shingle Jaccard, union-find over the
   verified pairs. All but one document of a cluster -> "near_duplicate".

Why 112 permutations as 16 bands x 7 rows, and a verification at J >= 0.8: a pair with Jaccard s
becomes a candidate with probability P(s) = 1 - (1 - s^r)^b. FineWeb uses 14 x 8 (threshold
(1/b)^(1/r) = 0.72) and keeps every candidate, so its curve must be steep to limit false positives:
P = 0.924 at s = 0.8, 0.772 at 0.75, 0.565 at 0.7, 0.053 at 0.5. We verify every candidate exactly, so
false positives cost only a verification, and we move the same 112 permutations to 16 x 7
(threshold 0.67): P = 0.977 at s = 0.8, 0.998 at 0.85, 0.899 at 0.75, 0.747 at 0.7, 0.118 at 0.5.
Recall at the 0.8 boundary rises from 92.4 % to 97.7 % while the candidates to verify grow only for
pairs in 0.5-0.8, which are rare in real text. 28 x 4 would catch everything above 0.7 but makes 84 %
of pairs at s = 0.5 candidates. Measured by `python -m bench.dedupe`.

Representative: the first document of a cluster in input order, and documents kept by earlier runs
before all of this run's. "First" rather than "longest" because a kept document is already published
downstream: a later run can only add, never replace, so the same rule must hold within a run.
A chain A~B~C puts C in A's cluster even when J(A, C) < 0.8 (union-find, as datatrove).

Incremental: the kept documents (id, normalised URL, text hash, normalised-text hash, signature,
shingle hashes) persist in `ctx.state_dir/dedupe_index.parquet`, and the LSH index is rebuilt from
it at start (about 20k docs/s); one file, so it is replaced atomically at the end of a successful run
and a crash leaves the previous index intact. A document kept before (same id and text hash) stays
kept; one whose text changed replaces its old entry; a new document that duplicates any kept one is
dropped. The shingle hashes (4 bytes per word kept) are stored so that cross-run pairs are verified
exactly, like in-run ones. `incremental=False` ignores the index.

Shared index: with `FAMILY_DEDUPE_INDEX=redis://HOST:PORT/DB` the same index lives in Redis instead,
so several homes (machines) dedupe against one history: the kept documents' columns in Redis hashes,
their order in a list, and the LSH buckets in datasketch's Redis storage (`MinHashLSH(storage_config=
{"type": "redis"})`), queried as it is rather than rebuilt. Candidates are the union of that index's
and this run's in-memory LSH, so the results are the ones the local index gives. A Redis lock replaces
the file lock. Where the index lives is a deployment setting, like the home's state folder, so it is
not part of the stage's config or fingerprint.

The text is read and normalised once, in one pass on a fork Pool(`workers`) over chunks of the
documents left after step 1 (`stages.text.minhash.parallel_text_keys`): each yields its normalised
text hash, shingle hashes and signature. Exact duplicates thus get a signature they do not use; a
normalise-and-sign costs about 3.5x a normalisation (`python -m bench.dedupe`), so this beats a
separate hashing pass, which normalises every kept text twice, while fewer than ~28% (1/3.5) of the
documents are exact duplicates. DuckDB runs after the pool has closed, never in a forked child.

Run:
    python -m stages.dedupe --config c.json --inputs i.json --run-dir DIR --state-dir STATE
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.contract import StageContext, StageError, StageResult, main
from stages.text.minhash import ShingleSpec, jaccard, parallel_text_keys
from storage import parquet
from storage.artifacts import Artifact

if TYPE_CHECKING:  # datasketch is imported where it is used: it pulls scipy in (~0.7 s), and every
    from datasketch import LeanMinHash, MinHashLSH  # `family` command imports this module for its Config

INPUTS = ("docs",)
OUTPUTS = ("docs_dedup", "dedupe_excluded")


@dataclass(frozen=True)
class Config:
    num_perm: int = 112
    bands: int = 16
    rows: int = 7  # bands x rows = num_perm; see the docstring for the S-curve
    jaccard_threshold: float = 0.8  # verified exact shingle Jaccard for a near-duplicate
    word_ngram: int = 5
    char_ngram: int = 5  # for CJK-dominant text
    cjk_ratio: float = 0.3  # share of CJK characters from which a text is shingled by characters
    seed: int = 1
    workers: int = 2
    docs_per_task: int = 256
    incremental: bool = True  # dedupe against, and add to, the index kept in ctx.state_dir
    rows_per_shard: int = 50_000

    def validate(self) -> None:
        if self.bands * self.rows > self.num_perm or self.bands < 2:
            raise ValueError(f"bands x rows ({self.bands} x {self.rows}) must be <= num_perm ({self.num_perm}), bands >= 2")
        if not 0.0 < self.jaccard_threshold <= 1.0:
            raise ValueError(f"jaccard_threshold must be in (0, 1], got {self.jaccard_threshold}")

    def shingle_spec(self) -> ShingleSpec:
        return ShingleSpec(self.word_ngram, self.char_ngram, self.cjk_ratio, self.num_perm, self.seed)


# -- 1. URLs -------------------------------------------------------------------------------------

DEFAULT_PORTS = {"http": 80, "https": 443}
TRACKING_PARAMS = {"gclid", "fbclid", "msclkid", "mc_cid", "mc_eid"}
INDEX_PAGES = ("/index.html", "/index.htm")


def normalize_url(url: str) -> str:
    """The key two URLs of the same page share (see the module docstring for the rules)."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a malformed port or IPv6 literal: compare the string as it is
        return url
    scheme = parts.scheme.lower()
    host = parts.hostname or ""  # lowercased by urllib, user info dropped
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    path = parts.path
    if path.endswith(INDEX_PAGES):
        path = path[: path.rfind("/") + 1]
    path = path.rstrip("/")
    params = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode(sorted((k, v) for k, v in params if not k.lower().startswith("utm_") and k.lower() not in TRACKING_PARAMS))
    return urlunsplit((scheme, netloc, path, query, ""))


# -- 2. exact text -------------------------------------------------------------------------------


def exact_duplicates(norm_hashes: list[str], previous: dict[str, str], threads: int = 2) -> list[tuple[int, int, str | None]]:
    """The rows of `norm_hashes` (hashes of normalised text, in input order) that repeat an earlier
    row or a document kept by an earlier run (`previous`: hash -> its id), grouped in DuckDB.

    Returns (row, first row with that hash, the earlier run's id or None) for those rows only, in no
    particular order. A first row is listed only when it repeats an earlier run's document.
    """
    run_t = pa.table({"row": pa.array(np.arange(len(norm_hashes), dtype=np.int64)), "h": pa.array(norm_hashes, pa.string())})
    previous_t = pa.table({"h": pa.array(list(previous), pa.string()), "kept_id": pa.array(list(previous.values()), pa.string())})
    sql = """
        WITH firsts AS (SELECT h, min(row) AS first_row FROM run_t GROUP BY h)
        SELECT run_t.row, firsts.first_row, previous_t.kept_id
        FROM run_t JOIN firsts USING (h) LEFT JOIN previous_t USING (h)
        WHERE run_t.row <> firsts.first_row OR previous_t.kept_id IS NOT NULL
    """
    with duckdb.connect(config={"threads": threads}) as con:
        con.register("run_t", run_t)
        con.register("previous_t", previous_t)
        return con.sql(sql).fetchall()


# -- 3. near-duplicates --------------------------------------------------------------------------


class UnionFind:
    """Disjoint sets whose root is always the member with the smallest rank (the earliest doc)."""

    def __init__(self, rank: dict[str, int]):
        self.rank = rank
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            first, second = (ra, rb) if self.rank[ra] < self.rank[rb] else (rb, ra)
            self.parent[second] = first


def near_duplicate_clusters(
    lsh: MinHashLSH,
    new_ids: list[str],
    new_sigs: np.ndarray,
    shingles: dict[str, np.ndarray],
    rank: dict[str, int],
    seed: int,
    threshold: float,
    progress=None,
) -> tuple[UnionFind, int]:
    """Insert the new docs into `lsh`, verify every candidate pair, and cluster the verified ones.

    new_sigs: (N, num_perm) uint32; `lsh` may already hold earlier kept docs, all present in
    `shingles` and `rank`. Returns the clusters and the number of candidate pairs checked.
    """
    from datasketch import LeanMinHash

    minhashes = [LeanMinHash(seed=seed, hashvalues=s, scheme="affine32") for s in new_sigs]
    with lsh.insertion_session() as session:
        for key, mh in zip(new_ids, minhashes):
            session.insert(key, mh, check_duplication=False)
    clusters = UnionFind(rank)
    checked = 0
    for i, (key, mh) in enumerate(zip(new_ids, minhashes)):
        for other in lsh.query(mh):
            if rank[other] >= rank[key]:  # each pair once, from its later member
                continue
            checked += 1
            if jaccard(shingles[key], shingles[other]) >= threshold:
                clusters.union(key, other)
        if progress is not None and (i % 1000 == 999 or i == len(new_ids) - 1):
            progress(i + 1, len(new_ids))
    return clusters, checked


# -- the persisted index ---------------------------------------------------------------------------

INDEX_FILE = "dedupe_index.parquet"
INDEX_FORMAT = "family-dedupe-index/1"  # bump when shingle hashing or the columns change
INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url_key", pa.string()),
        ("sha256", pa.string()),
        ("norm_hash", pa.string()),
        ("signature", pa.list_(pa.uint32())),
        ("shingles", pa.list_(pa.uint32())),
    ]
)


def index_params(cfg: Config) -> dict[str, Any]:
    """What must match for an index to be reused: the signature and shingle definitions."""
    return {"format": INDEX_FORMAT, **asdict(cfg.shingle_spec())}


def _split_list_column(column: pa.ChunkedArray) -> list[np.ndarray]:
    arr = column.combine_chunks()
    values = np.asarray(arr.values)
    offsets = np.asarray(arr.offsets)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def empty_index() -> dict[str, list]:
    return {name: [] for name in INDEX_SCHEMA.names}


def load_index(path: Path, cfg: Config) -> dict[str, list]:
    """The kept documents of earlier runs, column by column (empty lists when there is no index)."""
    if not path.exists():
        return empty_index()
    table = pq.read_table(path)
    stored = json.loads((table.schema.metadata or {}).get(b"family_dedupe", b"{}"))
    if stored != index_params(cfg):
        raise StageError(
            f"dedupe: the index at {path} was built with {stored}, the config asks for {index_params(cfg)}; "
            "restore those settings, or move the index away to start a new one"
        )
    cols: dict[str, list] = {name: table.column(name).to_pylist() for name in ("id", "url_key", "sha256", "norm_hash")}
    cols["signature"] = _split_list_column(table.column("signature"))
    cols["shingles"] = _split_list_column(table.column("shingles"))
    return cols


def save_index(path: Path, cols: dict[str, list], cfg: Config) -> None:
    """Write the whole index to one file atomically (temporary name, then os.replace)."""
    arrays = {name: pa.array(cols[name], pa.string()) for name in ("id", "url_key", "sha256", "norm_hash")}
    for name in ("signature", "shingles"):
        parts = cols[name]
        offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int32)
        values = np.concatenate(parts).astype(np.uint32) if parts else np.empty(0, np.uint32)
        arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.uint32()))
    schema = INDEX_SCHEMA.with_metadata({"family_dedupe": json.dumps(index_params(cfg))})
    parquet.write_table(pa.table(arrays, schema=schema), path, schema)


@contextmanager
def index_lock(state_dir: Path) -> Iterator[None]:
    """Two dedupe runs on one home would each overwrite the other's additions: take turns."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "dedupe.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the shared index in Redis -------------------------------------------------------------------

ENV_INDEX = "FAMILY_DEDUPE_INDEX"
STRING_COLUMNS = ("url_key", "sha256", "norm_hash")


class RedisIndex:
    """The persisted index of `load_index`/`save_index`, kept in Redis at `url` for several homes.

    Keys, under family-dedupe:<hash of index_params>: `params` (the JSON of index_params), `ids` (a
    list, the kept documents in the order they were kept), `col:<name>` (hashes id -> value; the
    signature and shingles as little-endian uint32 bytes) and `lsh*` (datasketch's buckets, keyed by id).
    """

    def __init__(self, url: str, cfg: Config):
        import redis  # only a home that shares its index needs the client

        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise StageError(f"dedupe: {ENV_INDEX}={url!r} is not a redis://HOST:PORT/DB URL")
        self.url, self.cfg = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}", cfg
        self.params = {"host": parts.hostname, "port": parts.port or 6379, "db": int(parts.path.strip("/") or 0),
                       "password": unquote(parts.password) if parts.password else None, "ssl": parts.scheme == "rediss"}
        self.redis = redis.Redis(**self.params, socket_connect_timeout=5)
        try:
            self.redis.ping()
        except redis.exceptions.RedisError as e:
            raise StageError(f"dedupe: cannot reach the shared index at {self.url} ({ENV_INDEX}): {e}; "
                             f"start Redis there or unset {ENV_INDEX} to use this home's own index") from None
        digest = hashlib.sha256(json.dumps(index_params(cfg), sort_keys=True).encode()).hexdigest()[:12]
        self.prefix = f"family-dedupe:{digest}:"

    def lsh(self) -> MinHashLSH:
        from datasketch import MinHashLSH

        storage = {"type": "redis", "redis": self.params, "basename": f"{self.prefix}lsh".encode()}
        return MinHashLSH(num_perm=self.cfg.num_perm, params=(self.cfg.bands, self.cfg.rows), storage_config=storage)

    @contextmanager
    def lock(self) -> Iterator[None]:
        with self.redis.lock(f"{self.prefix}lock", timeout=3600, blocking_timeout=3600):
            yield

    def load(self) -> dict[str, list]:
        stored = self.redis.get(f"{self.prefix}params")
        if stored is not None and json.loads(stored) != index_params(self.cfg):
            raise StageError(f"dedupe: the shared index at {self.url} holds {stored.decode()} under {self.prefix}, "
                             f"the config asks for {index_params(self.cfg)}")
        ids = [i.decode() for i in self.redis.lrange(f"{self.prefix}ids", 0, -1)]
        cols: dict[str, list] = {"id": ids}
        for name in (*STRING_COLUMNS, "signature", "shingles"):
            values = self.redis.hmget(f"{self.prefix}col:{name}", ids) if ids else []
            cols[name] = [v.decode() for v in values] if name in STRING_COLUMNS else [np.frombuffer(v, "<u4") for v in values]
        return cols

    def save(self, prev: dict[str, list], keep_prev: list[int], new: dict[str, list]) -> None:
        """Drop the replaced documents, add the new kept ones (LSH entries for those with shingles)."""
        from datasketch import LeanMinHash

        kept = {prev["id"][j] for j in keep_prev}
        gone = [key for key in prev["id"] if key not in kept]
        lsh = self.lsh()
        for key in gone:
            if key in lsh:
                lsh.remove(key)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(f"{self.prefix}params", json.dumps(index_params(self.cfg)))
        for name in (*STRING_COLUMNS, "signature", "shingles"):
            if gone:
                pipe.hdel(f"{self.prefix}col:{name}", *gone)
            if new["id"]:
                values = new[name] if name in STRING_COLUMNS else [np.asarray(v, "<u4").tobytes() for v in new[name]]
                pipe.hset(f"{self.prefix}col:{name}", mapping=dict(zip(new["id"], values)))
        pipe.execute()
        with lsh.insertion_session() as session:
            for key, sig, sh in zip(new["id"], new["signature"], new["shingles"]):
                if len(sh):
                    session.insert(key, LeanMinHash(seed=self.cfg.seed, hashvalues=sig, scheme="affine32"), check_duplication=False)
        pipe = self.redis.pipeline(transaction=True)  # the list last: it is what makes a document part of the index
        pipe.delete(f"{self.prefix}ids")
        order = [prev["id"][j] for j in keep_prev] + list(new["id"])
        if order:
            pipe.rpush(f"{self.prefix}ids", *order)
        pipe.execute()


class SharedLSH:
    """This run's in-memory LSH plus the shared index's, queried together; the shared one answers
    only documents of `known` (the index as loaded: not a replaced or half-saved entry)."""

    def __init__(self, local: MinHashLSH, shared: MinHashLSH, known: set[str]):
        self.local, self.shared, self.known = local, shared, known

    def insertion_session(self):
        return self.local.insertion_session()

    def query(self, mh: LeanMinHash) -> list[str]:
        return self.local.query(mh) + [k for k in self.shared.query(mh) if k in self.known]


# -- the stage -----------------------------------------------------------------------------------


def _excluded_row(doc: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"id": doc["id"], "url": doc["url"], "stage": "dedupe", "reason": reason, "detail": detail, "n_chars": doc["n_chars"], "text": doc["text"]}


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    from datasketch import LeanMinHash, MinHashLSH

    docs_path = Path(inputs["docs"].path)
    try:
        table = parquet.read_table(docs_path, "docs")
    except (FileNotFoundError, parquet.SchemaError) as e:
        raise StageError(f"dedupe: cannot read docs at {docs_path}: {e}; rerun the extract stage") from None
    n = table.num_rows
    if n == 0:
        raise StageError(f"dedupe: no documents in {docs_path}; check the extract stage's funnel (extract_excluded)")
    ctx.tracker.log_params(asdict(cfg))
    ids: list[str] = table.column("id").to_pylist()
    urls: list[str] = table.column("url").to_pylist()
    sha: list[str] = table.column("sha256").to_pylist()

    index_path = ctx.state_dir / INDEX_FILE
    shared = RedisIndex(os.environ[ENV_INDEX], cfg) if cfg.incremental and os.environ.get(ENV_INDEX) else None
    with (shared.lock() if shared else index_lock(ctx.state_dir)) if cfg.incremental else nullcontext():
        prev = (shared.load() if shared else load_index(index_path, cfg)) if cfg.incremental else empty_index()
        prev_row = {key: j for j, key in enumerate(prev["id"])}
        dropped: dict[int, tuple[str, str]] = {}  # position -> (reason, id of the kept doc it duplicates)

        # 0. a document kept by an earlier run with the same text stays kept; one whose text changed
        #    replaces its old entry (which stops being anyone's representative)
        carried = [i for i in range(n) if ids[i] in prev_row and prev["sha256"][prev_row[ids[i]]] == sha[i]]
        replaced = {ids[i] for i in range(n) if ids[i] in prev_row and prev["sha256"][prev_row[ids[i]]] != sha[i]}
        keep_prev = [j for j, key in enumerate(prev["id"]) if key not in replaced]
        carried_set = set(carried)

        # 1. URLs
        seen_url = {prev["url_key"][j]: prev["id"][j] for j in keep_prev}
        url_keys = [normalize_url(u) for u in urls]
        for i in range(n):
            if i in carried_set:
                continue
            if url_keys[i] in seen_url:
                dropped[i] = ("duplicate_url", seen_url[url_keys[i]])
            else:
                seen_url[url_keys[i]] = ids[i]

        # one pass over the text of the documents left: normalised-text hash, signature, shingles
        alive = [i for i in range(n) if i not in dropped and i not in carried_set]
        texts = table.column("text").take(pa.array(alive, pa.int64())).to_pylist() if alive else []
        norm_hashes, sigs, shingle_list = parallel_text_keys(
            texts, cfg.shingle_spec(), cfg.workers, cfg.docs_per_task, lambda d, t: ctx.progress(d, t, "text keys"),
            mapper=ctx.mapper,
        )
        row_of = {i: r for r, i in enumerate(alive)}

        # 2. exact text: DuckDB groups the hashes, and matches them with the earlier runs' ones
        previous_hashes = {prev["norm_hash"][j]: prev["id"][j] for j in keep_prev}
        for row, first_row, kept_id in exact_duplicates(norm_hashes, previous_hashes, threads=cfg.workers):
            dropped[alive[row]] = ("exact_duplicate", kept_id if kept_id is not None else ids[alive[first_row]])

        # 3. near-duplicates: LSH with the earlier kept docs, every candidate pair verified
        alive = [i for i in alive if i not in dropped]
        lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
        shingles: dict[str, np.ndarray] = {}
        rank: dict[str, int] = {}
        old = [j for j in keep_prev if len(prev["shingles"][j])]
        for r, j in enumerate(keep_prev):
            rank[prev["id"][j]] = r
        for j in old:
            shingles[prev["id"][j]] = prev["shingles"][j]
        near_dup_ids, near_dup_sigs = [], []
        for i in alive:
            sig, sh = sigs[row_of[i]], shingle_list[row_of[i]]
            rank[ids[i]] = len(keep_prev) + i
            if sh.size:  # a text without shingles (only punctuation) cannot be compared
                shingles[ids[i]] = sh
                near_dup_ids.append(ids[i])
                near_dup_sigs.append(sig)
        if old and shared is not None:  # the shared index's LSH already holds them
            lsh = SharedLSH(lsh, shared.lsh(), {prev["id"][j] for j in old})
        elif old:
            old_sigs = [LeanMinHash(seed=cfg.seed, hashvalues=prev["signature"][j], scheme="affine32") for j in old]
            with lsh.insertion_session() as session:
                for j, mh in zip(old, old_sigs):
                    session.insert(prev["id"][j], mh, check_duplication=False)
        clusters, checked = near_duplicate_clusters(
            lsh,
            near_dup_ids,
            np.asarray(near_dup_sigs, np.uint32).reshape(-1, cfg.num_perm),
            shingles,
            rank,
            cfg.seed,
            cfg.jaccard_threshold,
            lambda d, t: ctx.progress(d, t, "near-duplicates"),
        )
        for i in alive:
            rep = clusters.find(ids[i])
            if rep != ids[i]:
                dropped[i] = ("near_duplicate", rep)

        # outputs: kept docs in input order with their cluster, dropped ones with reason and detail
        kept = [i for i in range(n) if i not in dropped]
        out = table.take(pa.array(kept, pa.int64()))
        out = out.set_column(out.schema.get_field_index("cluster"), "cluster", pa.array([clusters.find(ids[i]) for i in kept], pa.string()))
        out_dir = ctx.output("docs_dedup")
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, start in enumerate(range(0, max(len(kept), 1), cfg.rows_per_shard)):
            parquet.write_table(out.slice(start, cfg.rows_per_shard), out_dir / f"part-{k:05d}.parquet", "docs")
        dropped_positions = sorted(dropped)
        dropped_docs = table.take(pa.array(dropped_positions, pa.int64())).select(["id", "url", "n_chars", "text"]).to_pylist()
        with parquet.ShardWriter(ctx.output("dedupe_excluded"), "excluded", cfg.rows_per_shard) as writer:
            for pos, doc in zip(dropped_positions, dropped_docs):
                writer.write(_excluded_row(doc, *dropped[pos]))

        # the index grows by this run's new kept docs; written last, in one atomic step
        if cfg.incremental and shared is not None:
            new = [i for i in kept if i not in carried_set]
            shared.save(prev, keep_prev, {
                "id": [ids[i] for i in new], "url_key": [url_keys[i] for i in new], "sha256": [sha[i] for i in new],
                "norm_hash": [norm_hashes[row_of[i]] for i in new], "signature": [sigs[row_of[i]] for i in new],
                "shingles": [shingle_list[row_of[i]] for i in new],
            })
        elif cfg.incremental:
            new = [i for i in kept if i not in carried_set]
            save_index(
                index_path,
                {
                    "id": [prev["id"][j] for j in keep_prev] + [ids[i] for i in new],
                    "url_key": [prev["url_key"][j] for j in keep_prev] + [url_keys[i] for i in new],
                    "sha256": [prev["sha256"][j] for j in keep_prev] + [sha[i] for i in new],
                    "norm_hash": [prev["norm_hash"][j] for j in keep_prev] + [norm_hashes[row_of[i]] for i in new],
                    "signature": [prev["signature"][j] for j in keep_prev] + [sigs[row_of[i]] for i in new],
                    "shingles": [prev["shingles"][j] for j in keep_prev] + [shingle_list[row_of[i]] for i in new],
                },
                cfg,
            )

    reasons = Counter(reason for reason, _ in dropped.values())
    metrics = {
        "docs_in": n,
        "docs_out": len(kept),
        "url_dups": reasons["duplicate_url"],
        "exact_dups": reasons["exact_duplicate"],
        "near_dups": reasons["near_duplicate"],
        "carried": len(carried),
        "candidate_pairs": checked,
        "index_size": (len(keep_prev) + len(kept) - len(carried)) if cfg.incremental else 0,
    }
    ctx.tracker.log_metrics(metrics)
    funnel, remaining = [{"stage": "dedupe", "step": "docs", "dropped": 0, "remaining": n}], n
    for step in ("duplicate_url", "exact_duplicate", "near_duplicate"):
        remaining -= reasons[step]
        funnel.append({"stage": "dedupe", "step": step, "dropped": reasons[step], "remaining": remaining})
    summary = (
        f"**dedupe**: kept {len(kept)} of {n} docs; dropped {reasons['duplicate_url']} same-URL, "
        f"{reasons['exact_duplicate']} exact and {reasons['near_duplicate']} near duplicates "
        f"({checked} candidate pairs verified at J >= {cfg.jaccard_threshold}); {len(carried)} kept by an earlier run."
    )
    return StageResult(
        outputs={"docs_dedup": {"rows": len(kept), "kind": "docs"}, "dedupe_excluded": {"rows": len(dropped), "kind": "excluded"}},
        metrics=metrics,
        summary=summary,
        tables={"funnel": funnel},
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))
