"""Train the byte-level BPE tokenizer on the clean corpus and write the token shards for pretraining.

What: reads `docs_clean` (schema `docs`), splits the documents into train and val by a hash of their
id, trains a byte-level BPE (Sennrich et al. 2016; the GPT-2 byte-level variant, Radford et al. 2019)
with HF `tokenizers` on the train documents, and writes
- `tokenizer`: tokenizer.json, tokenizer_config.json (ChatML chat template, eos = pad =
  <|endoftext|>, the base-model convention; a chat stage re-saves with eos <|im_end|>) and
  special_tokens_map.json, loadable by `transformers.AutoTokenizer` and by `models.tokenizer`;
- `tokens`: train.bin / val.bin (every document's ids followed by <|endoftext|>, uint16 when the
  vocabulary fits) and meta.json with token, byte and document counts per split.

The tokenizer: Qwen2's pre-tokenization regex (`models.tokenizer.QWEN2_PATTERN`), which among
other things splits digits one per token (`split_digits`, as Llama and Qwen do: a number's tokens
then line up with its digits, which is what arithmetic needs), then the byte-to-unicode map
(ByteLevel, no prefix space, no regex of its own), no normalizer, so decode(encode(text)) == text
for any text. llama.cpp knows this pre-tokenizer as "qwen2" and Ollama's qwen3 engine always uses
it, so the GGUF exports (stages/quantize.py) tokenize exactly as we do. split_digits=false is GPT-2's
regex instead (llama.cpp "gpt-2"). The 8 special tokens of
`models.tokenizer.SPECIAL_TOKENS` take ids 0..7, then the 256 byte symbols, then the merges.

Deviations: the tokenizer is trained on the train split only, so that validation bits per byte are
measured on text the tokenizer never saw; `max_train_bytes` caps the training text (BPE counts all
pre-token types in memory) with a deterministic prefix of the train documents.

Run:
    python -m stages.tokenizer --config c.json --inputs i.json --run-dir DIR
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from models.tokenizer import EOT, QWEN2_PATTERN, SPECIAL_TOKENS, Tokenizer
from stages.contract import StageContext, StageError, StageResult, main
from storage import parquet
from storage.artifacts import Artifact

INPUTS = ("docs_clean",)
OUTPUTS = ("tokenizer", "tokens")
ENCODE_BATCH_DOCS = 256  # documents per encode_batch call: enough for the Rust thread pool


@dataclass(frozen=True)
class Config:
    vocab_size: int = 4096
    min_frequency: int = 2  # a pair must occur this often to be merged
    split_digits: bool = True  # Qwen2's regex: one token per digit (Llama, Qwen); false: GPT-2's, multi-digit tokens
    val_frac: float = 0.05  # fraction of documents (by id hash) held out; at least one
    max_train_bytes: int = 1_000_000_000  # cap on the text the BPE trainer sees

    def validate(self) -> None:
        floor = len(SPECIAL_TOKENS) + 256
        if self.vocab_size < floor:
            raise ValueError(f"vocab_size must be >= {floor} (special tokens + 256 bytes), got {self.vocab_size}")
        if not 0.0 < self.val_frac < 1.0:
            raise ValueError(f"val_frac must be in (0, 1), got {self.val_frac}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")


def split_key(doc_id: str) -> float:
    """A number in [0, 1) from the document id: the same document lands in the same split every run."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def assign_splits(ids: list[str], val_frac: float) -> list[bool]:
    """is_val per document: key < val_frac, and at least one val and one train document."""
    keys = [split_key(i) for i in ids]
    is_val = [k < val_frac for k in keys]
    if not any(is_val):
        is_val[min(range(len(keys)), key=keys.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(keys)), key=keys.__getitem__)] = False
    return is_val


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int, split_digits: bool = True) -> HFTokenizer:
    """Byte-level BPE with SPECIAL_TOKENS at ids 0..len-1."""
    tok = HFTokenizer(models.BPE())
    if split_digits:  # exactly the pre_tokenizer of Qwen2's tokenizer.json
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


_worker_tokenizers: dict[str, Tokenizer] = {}


def _encode_task(args: tuple[str, list[str]]) -> list[list[int]]:
    """One batch on a worker of ctx.mapper: (tokenizer.json text, texts) -> token ids per text."""
    tok_json, batch = args
    key = hashlib.sha256(tok_json.encode()).hexdigest()
    if key not in _worker_tokenizers:
        _worker_tokenizers.clear()  # one tokenizer at a time: a worker serves one stage run after another
        _worker_tokenizers[key] = Tokenizer(HFTokenizer.from_str(tok_json))
    return _worker_tokenizers[key].encode_batch(batch)


def _encode_batches(is_val: list[bool], texts: Iterator[str]) -> Iterator[list[tuple[bool, str]]]:
    batch: list[tuple[bool, str]] = []
    for v, text in zip(is_val, texts):
        batch.append((v, text))
        if len(batch) == ENCODE_BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup: document ids, sizes and the split
    src = inputs["docs_clean"].path
    try:
        parquet.check_schema(src, "docs")
        ids = parquet.read_table(src, columns=["id"]).column("id").to_pylist()
    except (parquet.SchemaError, FileNotFoundError) as e:
        raise StageError(f"tokenizer: unreadable docs_clean at {src}: {e}; rebuild the filter stage") from None
    if len(ids) < 2:
        raise StageError(f"tokenizer: docs_clean at {src} has {len(ids)} document(s), need at least 2 (one per split); relax the filter stage")
    is_val = assign_splits(ids, cfg.val_frac)

    def texts(split_val: bool | None = None, max_bytes: int | None = None) -> Iterator[str]:
        used = 0
        for v, row in zip(is_val, parquet.iter_rows(src, columns=["text"])):  # same order as ids
            if split_val is not None and v != split_val:
                continue
            text = row["text"] or ""
            yield text
            used += len(text.encode())
            if max_bytes is not None and used >= max_bytes:
                return

    # train
    ctx.progress(0, 1, "train BPE")
    t0 = time.perf_counter()
    hf_tok = train_bpe(texts(split_val=False, max_bytes=cfg.max_train_bytes), cfg.vocab_size, cfg.min_frequency, cfg.split_digits)
    train_s = time.perf_counter() - t0
    tok = Tokenizer(hf_tok)
    if tok.eot_id != 0:
        raise RuntimeError(f"{EOT} got id {tok.eot_id}, expected 0")  # the trainer places specials first
    ctx.progress(1, 1, "train BPE")
    tok_dir = ctx.output("tokenizer")
    tok.save(tok_dir)

    # encode: one pass in document order, each document appended to its split's file
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    out = ctx.output("tokens")
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": [0, 0, 0], "val": [0, 0, 0]}  # tokens, bytes, documents
    tmp = {split: out / f".{split}.bin.tmp-{os.getpid()}" for split in counts}
    t0 = time.perf_counter()
    with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
        files = {"train": f_train, "val": f_val}
        if ctx.mapper is not None:
            batches = list(_encode_batches(is_val, texts()))
            tok_json = (tok_dir / "tokenizer.json").read_text()
            encoded = zip(batches, ctx.mapper(_encode_task, [(tok_json, [t for _, t in b]) for b in batches]))
        else:
            encoded = ((b, tok.encode_batch([t for _, t in b])) for b in _encode_batches(is_val, texts()))
        i = 0
        for batch, batch_ids in encoded:
            for (v, text), doc_ids in zip(batch, batch_ids):
                split = "val" if v else "train"
                arr = np.asarray(doc_ids + [tok.eot_id], dtype=dtype)  # (n_tokens + 1,)
                arr.tofile(files[split])
                c = counts[split]
                c[0] += len(arr)
                c[1] += len(text.encode())
                c[2] += 1
            i += len(batch)
            ctx.progress(i, len(ids), "encode")
    for split, path in tmp.items():
        os.replace(path, out / f"{split}.bin")
    encode_s = time.perf_counter() - t0

    (train_tokens, train_bytes, train_docs), (val_tokens, val_bytes, val_docs) = counts["train"], counts["val"]
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train_bytes": train_bytes,
        "val_bytes": val_bytes,
        "train_docs": train_docs,
        "val_docs": val_docs,
        "tokens_per_byte": train_tokens / max(train_bytes, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    metrics = {
        "vocab_size": tok.vocab_size,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "tokens_per_byte": meta["tokens_per_byte"],
        "train_docs": train_docs,
        "val_docs": val_docs,
        "train_s": train_s,
        "encode_tokens_per_s": (train_tokens + val_tokens) / max(encode_s, 1e-9),
    }
    ctx.tracker.log_metrics(metrics)
    summary = (
        f"Byte-level BPE with {tok.vocab_size} tokens (asked {cfg.vocab_size}), trained in {train_s:.1f} s on "
        f"{train_docs} documents. train: {train_tokens:,} tokens from {train_bytes:,} bytes "
        f"({meta['tokens_per_byte']:.3f} tokens/byte); val: {val_tokens:,} tokens, {val_docs} documents."
    )
    return StageResult(
        outputs={"tokenizer": {"vocab_size": tok.vocab_size}, "tokens": meta},
        metrics=metrics,
        summary=summary,
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))
