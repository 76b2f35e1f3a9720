"""The keys documents are deduplicated on, computed in one parallel pass over their text.

Each text is normalised once (`simplify_text`) and gives three keys: the md5 of the normalised text
(hex, the exact-duplicate key), its shingle hashes and its MinHash signature.

Shingles (Broder 1997): word 5-grams of `simplify_text(text)`, as FineWeb/datatrove; for
CJK-dominant text, which has no spaces between words, character 5-grams of the text with its spaces
removed. A document shorter than one shingle is a single shingle (datatrove does the same).

Each shingle is hashed to 32 bits in numpy: crc32 per word (or the code point per character), a
polynomial over the n units mod 2^64, the MurmurHash3 64-bit finaliser, and the top 32 bits. The
32-bit values go to datasketch `MinHash.bulk` with `hashfunc=int`, which applies its own affine32
permutations. This replaces datasketch's default per-shingle SHA-1 of the shingle's bytes, the
slowest part of the usual recipe; the signature has the same meaning (a MinHash of the shingle set),
and `shingle_hashes` doubles as the exact shingle set for verifying candidate pairs (`jaccard`).
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from stages.text.normalize import simplify_text
from stages.text.workers import worker_pool

# Hiragana, Katakana, Bopomofo, CJK Ext. A, CJK Unified, Hangul syllables, CJK compatibility
_CJK = re.compile(r"[\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_POLY = np.uint64(0x100000001B3)  # FNV-64 prime: an odd multiplier that spreads small unit values
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S32 = np.uint64(32)


@dataclass(frozen=True)
class ShingleSpec:
    word_ngram: int = 5
    char_ngram: int = 5
    cjk_ratio: float = 0.3  # CJK characters / non-space characters at or above which char n-grams are used
    num_perm: int = 112
    seed: int = 1


def is_cjk_dominant(simplified: str, ratio: float) -> bool:
    chars = len(simplified) - simplified.count(" ")
    return chars > 0 and len(_CJK.findall(simplified)) >= ratio * chars


class TextKeys(NamedTuple):
    norm_hashes: list[str]  # md5 hex of the UTF-8 of simplify_text(text): equal for exact duplicates
    signatures: np.ndarray  # (N, num_perm) uint32
    shingles: list[np.ndarray]  # N sorted unique (S,) uint32 arrays


def shingle_hashes(text: str, spec: ShingleSpec) -> np.ndarray:
    """Sorted unique 32-bit hashes of the shingles of `text`: (S,) uint32, S = 0 for blank text."""
    return _shingles_of_simplified(simplify_text(text), spec)


def _shingles_of_simplified(s: str, spec: ShingleSpec) -> np.ndarray:
    if is_cjk_dominant(s, spec.cjk_ratio):
        units = np.frombuffer(s.replace(" ", "").encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = spec.char_ngram
    else:
        units = np.fromiter((zlib.crc32(w) for w in s.encode().split()), dtype=np.uint64)
        n = spec.word_ngram
    if units.size == 0:
        return np.empty(0, dtype=np.uint32)
    n = min(n, units.size)
    m = units.size - n + 1
    h = np.zeros(m, dtype=np.uint64)  # (m,) one value per shingle; uint64 arithmetic wraps mod 2^64
    for k in range(n):
        h = h * _POLY + units[k : k + m]
    h ^= h >> _S33
    h *= _FMIX1
    h ^= h >> _S33
    h *= _FMIX2
    h ^= h >> _S33
    return np.unique((h >> _S32).astype(np.uint32))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique shingle-hash arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 0.0


def text_keys(texts: Sequence[str], spec: ShingleSpec) -> TextKeys:
    """Normalised-text hashes, MinHash signatures and shingle sets of `texts`, in this process.

    A text without shingles gets an all-max signature; callers must not index it (it would match
    every other empty text).
    """
    from datasketch import MinHash  # here, not at the top: it pulls scipy in, and every `family` command imports this module

    simplified = [simplify_text(t) for t in texts]
    norm_hashes = [hashlib.md5(s.encode()).hexdigest() for s in simplified]
    shingles = [_shingles_of_simplified(s, spec) for s in simplified]
    minhashes = MinHash.bulk([s.tolist() for s in shingles], num_perm=spec.num_perm, seed=spec.seed, hashfunc=int)
    sigs = np.stack([m.hashvalues for m in minhashes]) if minhashes else np.empty((0, spec.num_perm), np.uint32)
    return TextKeys(norm_hashes, sigs.astype(np.uint32, copy=False), shingles)


def _text_keys_task(args: tuple[list[str], ShingleSpec]) -> TextKeys:
    return text_keys(*args)


def parallel_text_keys(
    texts: Sequence[str],
    spec: ShingleSpec,
    workers: int = 2,
    chunk_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    mapper: Callable[[Callable, list], Iterable[TextKeys]] | None = None,
) -> TextKeys:
    """`text_keys` over chunks of `chunk_size` texts on a pool of `workers` (stages/text/workers.py), or on `mapper` (a
    stage's ctx.mapper) when given; same result, in order."""
    chunks = [(list(texts[i : i + chunk_size]), spec) for i in range(0, len(texts), chunk_size)]
    keys = TextKeys([], np.empty((0, spec.num_perm), np.uint32), [])
    sig_parts: list[np.ndarray] = [keys.signatures]

    def collect(results: Iterable[TextKeys]) -> None:
        for part in results:
            keys.norm_hashes.extend(part.norm_hashes)
            sig_parts.append(part.signatures)
            keys.shingles.extend(part.shingles)
            if progress is not None:
                progress(len(keys.shingles), len(texts))

    if mapper is not None:
        collect(mapper(_text_keys_task, chunks))
    elif workers <= 1 or len(chunks) <= 1:
        collect(map(_text_keys_task, chunks))
    else:
        with worker_pool(workers) as pool:  # forked from a forkserver that built the normalisation tables
            collect(pool.imap(_text_keys_task, chunks))
    return keys._replace(signatures=np.concatenate(sig_parts))
