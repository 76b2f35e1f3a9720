"""A small real corpus for the retrieval stages' tests: pydoc's HTML pages of standard-library
modules as trafilatura extracts them (what the crawl + extract stages give for the default corpus)."""
from __future__ import annotations

import hashlib
import importlib
import pydoc
from pathlib import Path

import trafilatura

from storage.parquet import write_table

MODULES = ["json", "textwrap", "heapq", "string", "math", "bisect", "random", "shlex", "base64", "fnmatch", "glob",
           "difflib", "calendar", "statistics", "html", "urllib.parse", "copy", "csv", "gzip", "zlib", "secrets",
           "uuid", "colorsys", "keyword"]


def html_text(name: str) -> str:
    doc = pydoc.HTMLDoc()
    module = importlib.import_module(name)
    return trafilatura.extract(doc.page(pydoc.describe(module), doc.document(module, name)), favor_recall=True) or ""


def docs_dir(root: Path, modules: list[str] = MODULES) -> Path:
    rows = []
    for i, name in enumerate(modules):
        text = html_text(name)
        rows.append(dict(id=str(i), url=f"http://pydoc.localhost/3.11/{name}.html", source="pydoc",
                         title=f"Python: module {name}", text=text, lang="en", lang_score=1.0, n_chars=len(text),
                         n_words=len(text.split()), sha256=hashlib.sha256(text.encode()).hexdigest(), cluster=""))
    write_table(rows, root / "docs" / "part-00000.parquet", "docs")
    return root / "docs"


def make_base(root: Path, docs: Path, d_model: int = 32, max_seq_len: int = 128, seed: int = 0) -> Path:
    """A base model directory: a byte-level BPE trained on the corpus and an untrained GPT."""
    import torch
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from models.gpt import GPT, GPTConfig
    from models.tokenizer import SPECIAL_TOKENS, Tokenizer
    from storage.parquet import iter_rows

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([r["text"] for r in iter_rows(docs)] + ["yes no"] * 20, trainer)
    tok = Tokenizer(hf)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=d_model, n_layers=1, n_heads=2, n_kv_heads=1,
                          max_seq_len=max_seq_len))
    out = root / "base"
    model.save_pretrained(out)
    tok.save(out)
    return out


_BUILT: dict[str, dict[str, Path]] = {}

SMALL_RETRIEVAL = {"max_chars": 300, "max_eval_queries": 40}
SMALL_EMBED = {"max_steps": 8, "batch_size": 16, "instruction": "Query:", "warmup_steps": 2, "log_every": 4}
SMALL_RERANK = {"max_steps": 4, "easy_steps": 2, "batch_size": 4, "depth": 5, "first_stage_depth": 20,
                "instruction": "Relevant?", "warmup_steps": 1, "log_every": 2}


def built(modules: tuple[str, ...] = tuple(MODULES[:14])) -> dict[str, Path]:
    """The toy corpus run through retrieval, embed and rerank once per test session (a temporary
    directory): {"docs", "base", "passages", "pairs", "qrels", "embedder", "reranker", "root"}."""
    key = ",".join(modules)
    if key in _BUILT:
        return _BUILT[key]
    import tempfile

    from stages import embed, rerank, retrieval
    from stages.contract import build_config
    from tests.conftest import artifact, make_ctx

    root = Path(tempfile.mkdtemp(prefix="retrieval-toy-"))
    paths: dict[str, Path] = {"root": root, "docs": docs_dir(root, list(modules))}
    paths["base"] = make_base(root, paths["docs"], max_seq_len=96)
    for module, cfg in ((retrieval, SMALL_RETRIEVAL), (embed, SMALL_EMBED), (rerank, SMALL_RERANK)):
        name = module.__name__.rsplit(".", 1)[-1]
        ctx = make_ctx(root / name, stage=name)
        inputs = {i: artifact(i, paths[i if i != "docs_clean" else "docs"]) for i in module.INPUTS}
        module.run(build_config(module.Config, cfg, name), inputs, ctx)
        for out in module.OUTPUTS:
            paths[out] = ctx.output(out)
    _BUILT[key] = paths
    return paths
