"""Main-text extraction quality: our extract stage vs trafilatura's defaults, on trafilatura's pages.

    python -m bench.extract

Data: shared/data/trafilatura_html, 30 real pages with trafilatura's own annotations
(evaldata.subset.json): `with` snippets that belong to the main text, `without` snippets that are
boilerplate. Metric, as trafilatura's evaluation computes it: a `with` snippet found in the
extracted text is a true positive, missing a false negative; a `without` snippet found is a false
positive, absent a true negative. P = TP / (TP + FP), R = TP / (TP + FN), F1 their harmonic mean.

Rows: `ours` is `stages.extract.extract_page` with the default Config (bytes in, our decoding,
favor_recall=True, tables, cleanup); `trafilatura_default` is `trafilatura.extract(bytes)` with no
options (favor_recall False), the reference. Also: characters kept on pydoc pages, the tiny recipe's
corpus, where favor_recall matters most. Last line: one JSON object.
"""
from __future__ import annotations

import json
import pydoc
import time
from pathlib import Path

import trafilatura

from stages import extract

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "trafilatura_html"
PYDOC_MODULES = ("json", "heapq", "collections", "textwrap", "argparse")


def score(texts: dict[str, str], truth: dict[str, dict]) -> dict[str, float]:
    tp = fn = fp = tn = 0
    for name, entry in truth.items():
        text = texts[name]
        found = [s in text for s in entry["with"]]
        leaked = [s in text for s in entry["without"]]
        tp, fn = tp + sum(found), fn + len(found) - sum(found)
        fp, tn = fp + sum(leaked), tn + len(leaked) - sum(leaked)
    p, r = tp / (tp + fp), tp / (tp + fn)
    return {"tp": tp, "fn": fn, "fp": fp, "tn": tn, "precision": p, "recall": r, "f1": 2 * p * r / (p + r)}


def ours(body: bytes, url: str) -> str:
    doc, _ = extract.extract_page({"url": url, "status": 200, "content_type": "text/html", "body": body}, extract.Config())
    return doc["text"] if doc else ""


def pydoc_html(name: str) -> str:
    module = pydoc.importlib.import_module(name)
    html = pydoc.HTMLDoc()
    return html.page(pydoc.describe(module), html.document(module, name))


def main() -> None:
    truth = {v["file"]: v for v in json.loads((DATA / "evaldata.subset.json").read_text()).values()}
    pages = {name: (DATA / name).read_bytes() for name in truth}
    extract.language_identifier()  # load the model outside the timings

    results, seconds = {}, {}
    for label, fn in (("ours", lambda b, n: ours(b, f"https://eval.test/{n}")), ("trafilatura_default", lambda b, n: trafilatura.extract(b) or "")):
        t0 = time.perf_counter()
        texts = {name: fn(body, name) for name, body in pages.items()}
        seconds[label] = time.perf_counter() - t0
        results[label] = score(texts, truth)

    print(f"{len(pages)} pages, {sum(len(v['with']) for v in truth.values())} with / {sum(len(v['without']) for v in truth.values())} without snippets")
    print(f"{'':22s} {'P':>6s} {'R':>6s} {'F1':>6s}  TP FN FP TN   ms/page")
    for label, s in results.items():
        print(f"{label:22s} {s['precision']:6.3f} {s['recall']:6.3f} {s['f1']:6.3f}  {s['tp']} {s['fn']} {s['fp']} {s['tn']}   {1000 * seconds[label] / len(pages):.0f}")

    pydoc_chars = {}
    for name in PYDOC_MODULES:
        html = pydoc_html(name)
        pydoc_chars[name] = {"ours": len(ours(html.encode(), f"http://127.0.0.1/{name}.html")), "trafilatura_default": len(trafilatura.extract(html) or "")}
    print("pydoc pages, characters kept (ours / trafilatura default):")
    for name, c in pydoc_chars.items():
        print(f"  {name:12s} {c['ours']:7d} / {c['trafilatura_default']:7d}")
    total_ours = sum(c["ours"] for c in pydoc_chars.values())
    total_default = sum(c["trafilatura_default"] for c in pydoc_chars.values())
    print(json.dumps({
        "pages": len(pages),
        "ours": {k: round(v, 4) for k, v in results["ours"].items()},
        "trafilatura_default": {k: round(v, 4) for k, v in results["trafilatura_default"].items()},
        "f1_ratio": round(results["ours"]["f1"] / results["trafilatura_default"]["f1"], 4),
        "ms_per_page": {k: round(1000 * v / len(pages), 1) for k, v in seconds.items()},
        "pydoc_chars": pydoc_chars,
        "pydoc_chars_ratio": round(total_ours / total_default, 3),
    }))


if __name__ == "__main__":
    main()
