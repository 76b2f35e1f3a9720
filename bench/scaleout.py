"""Data stages on Dask: docs/s of dedupe and filter with 1 and 2 Dask workers, side by side.

Documents are 300-word windows of the Python standard library's source files (real text, a few
thousand of them). Each stage runs as in a flow with `runner: dask`: its shards are Prefect task runs
(a temporary Prefect server) on a distributed LocalCluster of 1, then 2 worker processes, and once
in process for reference. The outputs of the three are checked to be the same bytes. Prints one JSON
line: docs/s per setting and the 2-vs-1-worker ratio per stage.

    python -m bench.scaleout [--docs 4000]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

from stages import dedupe, filter as filter_stage
from stages.contract import StageContext
from storage import parquet
from storage.artifacts import Artifact


def corpus(n_docs: int, words: int = 300) -> list[dict]:
    docs = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            tokens = f.read_text(encoding="utf-8").split()
        except (UnicodeDecodeError, OSError):
            continue
        for start in range(0, len(tokens) - words, words):
            text = " ".join(tokens[start : start + words])
            url = f"https://stdlib.example/{f.name}/{start}"
            docs.append({"id": hashlib.sha256(url.encode()).hexdigest(), "url": url, "source": "text", "title": "",
                         "text": text, "lang": "en", "lang_score": 1.0, "n_chars": len(text), "n_words": words,
                         "sha256": hashlib.sha256(text.encode()).hexdigest(), "cluster": ""})
            if len(docs) == n_docs:
                return docs
    return docs


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def run_stage(module, cfg, inputs: dict[str, Artifact], root: Path, mapper) -> tuple[float, dict[str, bytes]]:
    ctx = StageContext(stage=module.__name__.rsplit(".", 1)[-1], run_dir=root / "out", checkpoint_dir=root / "ckpt",
                       state_dir=root / "state", mapper=mapper)
    for d in (ctx.run_dir, ctx.checkpoint_dir, ctx.state_dir):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    module.run(cfg, inputs, ctx)
    return time.perf_counter() - t0, dir_bytes(ctx.run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=4000)
    args = p.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.dask_runner import DaskMapper, open_runner
    from flows.recipe import RunnerSpec

    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    docs = corpus(args.docs)
    parquet.write_table(docs, root / "docs" / "part-00000.parquet", "docs")
    inputs = {"docs": Artifact("docs", str(root / "docs"), "bench", {}), "docs_dedup": Artifact("docs_dedup", str(root / "docs"), "bench", {})}
    stages = {"dedupe": (dedupe, dedupe.Config(incremental=False)), "filter": (filter_stage, filter_stage.Config())}

    @flow(name="bench-scaleout")
    def measure(workers: int) -> dict[str, tuple[float, dict[str, bytes]]]:
        out = {}
        with open_runner(RunnerSpec("dask", workers=workers)) as runner:
            for name, (module, cfg) in stages.items():
                run_stage(module, cfg, inputs, root / f"warm-{workers}-{name}", DaskMapper(runner, name))  # workers import and warm up
                out[name] = run_stage(module, cfg, inputs, root / f"dask{workers}-{name}", DaskMapper(runner, name))
        return out

    local = {name: run_stage(module, cfg, inputs, root / f"local-{name}", None) for name, (module, cfg) in stages.items()}
    with prefect_test_harness(server_startup_timeout=120):
        one, two = measure(1), measure(2)
    report = {"docs": len(docs), "cpus": os.cpu_count()}
    for name in stages:
        assert one[name][1] == two[name][1] == local[name][1], f"{name}: the outputs differ between runners"
        rate = {k: len(docs) / r[name][0] for k, r in (("in_process", local), ("dask_1_worker", one), ("dask_2_workers", two))}
        report[name] = {f"{k}_docs_per_s": round(v, 1) for k, v in rate.items()}
        report[name]["ratio_2_vs_1_workers"] = round(rate["dask_2_workers"] / rate["dask_1_worker"], 3)
    report["outputs_identical"] = True
    print(json.dumps(report))


if __name__ == "__main__":
    main()
