"""The family report from evaluation.json: report.html (self-contained: inline style, figures as
base64 PNG, no script and no external resource), the text summary `family report` prints, and the
markdown summary the flow shows as a Prefect artifact."""
from __future__ import annotations

import html
from typing import Any

from stages.report import plots

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.pass{color:#1a7f37;font-weight:bold}.fail{color:#c62828;font-weight:bold}.absent{color:#888}
.card{border:1px solid #ccc;border-radius:6px;padding:.4em 1em;margin:1em 0}.note{color:#666;font-size:.9em}
img{max-width:100%;display:block;margin:.5em 0}
"""


def esc(v: Any) -> str:
    return html.escape(str(v))


def num(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if plots.finite(v) else "-"


def interval(v: Any, lo: Any, hi: Any, fmt: str = ".3f") -> str:
    return f"{num(v, fmt)} [{num(lo, fmt)}, {num(hi, fmt)}]" if plots.finite(v) else "-"


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(b64: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def gate_line(g: dict[str, Any]) -> str:
    against = f" ({g['against']})" if g["against"] else ""
    return f"{g['member']}/{g['figure']} {num(g['value'])} {g['op']} {num(g['threshold'])}{against}"


def gates_section(ev: dict[str, Any]) -> str:
    if not ev["gates"]:
        return "<p>No gates in this recipe (evaluate.gates).</p>"
    rows = [[esc(g["member"]), esc(g["figure"]), num(g["value"]), esc(g["op"]), num(g["threshold"]), esc(g["against"]),
             '<span class="pass">pass</span>' if g["passed"] else f'<span class="fail">fail</span> {esc(g["note"])}']
            for g in ev["gates"]]
    promo = ", ".join(f'<span class="{"pass" if ok else "fail"}">{esc(m)}</span>' for m, ok in ev["promote"].items())
    return (table(["member", "figure", "value", "", "threshold", "from", "result"], rows)
            + f"<p>Members passing every gate get the MLflow alias <code>champion</code>: {promo}</p>")


def headline_section(ev: dict[str, Any]) -> str:
    rows = [[esc(h["member"]), esc(h["figure"]), interval(h["value"], h["lo"], h["hi"]), num(h.get("baseline")),
             esc(h.get("baseline_name", "")), esc(h.get("n", "")), esc(h["split"])] for h in ev["headline"]]
    absent = [m for m, s in ev["members"].items() if s["status"] == "absent"]
    note = f'<p class="absent">Absent from this recipe: {esc(", ".join(absent))}</p>' if absent else ""
    return table(["member", "figure", "value [95% interval]", "baseline", "baseline is", "n", "split"], rows) + note


def deltas_section(ev: dict[str, Any]) -> str:
    rows = [[f"{esc(d['from'])} &rarr; {esc(d['to'])}", esc(d["figure"]), interval(d["delta"], d.get("lo"), d.get("hi"), "+.3f"),
             num(d.get("p"), ".3g"), esc(f"+{d['gained']} / -{d['lost']}" if "gained" in d else ""), esc(d.get("n", "")),
             esc(d["test"])] for d in ev["deltas"]]
    return table(["lineage", "figure", "delta [95% interval]", "p", "gained / lost", "n", "test"], rows) if rows else ""


def accuracy_section(ev: dict[str, Any]) -> str:
    out = []
    tasks = sorted({t for m in ev["tasks"].values() for t in m})
    if tasks:
        series = {m: {t: {"value": v["acc"], "lo": v["lo"], "hi": v["hi"]} for t, v in per.items()} for m, per in ev["tasks"].items()}
        base = {t: v["acc"] for t, v in ev["baseline"].items()}
        out.append(img(plots.interval_bars(tasks, series, "greedy accuracy per task (test)", "accuracy", base,
                                           "most common answer"), "per-task accuracy"))
        rows = [[esc(t), esc(ev["prompts"]["per_task"].get(t, "")), num(ev["baseline"].get(t, {}).get("acc"))]
                + [interval(ev["tasks"][m][t]["acc"], ev["tasks"][m][t]["lo"], ev["tasks"][m][t]["hi"]) if t in ev["tasks"][m]
                   else "-" for m in ev["tasks"]] for t in tasks]
        out.append(table(["task", "prompts", "most common answer", *ev["tasks"]], rows))
    if ev["rank"]:
        series = {m: {t: {"value": v["acc"], "lo": v["lo"], "hi": v["hi"]} for t, v in per.items()} for m, per in ev["rank"].items()}
        ranked = sorted({t for m in ev["rank"].values() for t in m})
        out.append(img(plots.interval_bars(ranked, series, "likelihood ranking of the reference among distractors (test)",
                                           "accuracy", {t: ev["rank_chance"] for t in ranked}, "chance"), "ranking"))
    if ev["sampling"]:
        out.append(img(plots.pass_plot(ev["sampling"]), "sampling"))
        rows = [[esc(r["member"])] + [interval(f["value"], f["lo"], f["hi"]) for f in r["figures"]] for r in ev["sampling"]]
        out.append(table(["member", *[f["figure"] for f in ev["sampling"][0]["figures"]]], rows))
    return "".join(out) or "<p class='absent'>No chat model in this recipe.</p>"


def quant_section(ev: dict[str, Any]) -> str:
    q = ev["quantization"]
    if not q:
        return "<p class='absent'>No quantized members.</p>"
    rows = [[esc(r["member"]), esc(r["variant"]), num(r["bytes"] / 1e6, ".2f"), num(r["test_loss"], ".4f"),
             interval(r["increase"], r["lo"], r["hi"], "+.2%")] for r in q]
    return img(plots.quant_plot(q), "quantization") + table(["member", "weights", "MB", "test loss", "increase [95%]"], rows)


def retrieval_section(ev: dict[str, Any]) -> str:
    f = ev["figures"]
    systems = [s for s in ("bm25", "embedder", "hybrid", "reranker") if f"{s}/ndcg@10" in f]
    if not systems:
        return "<p class='absent'>No retrieval members.</p>"
    metrics = ["ndcg@10", "mrr@10", "recall@10", "recall@50"]
    series = {s: {m: {"value": f[f"{s}/{m}"], "lo": f.get(f"{s}/{m}_lo", f[f"{s}/{m}"]), "hi": f.get(f"{s}/{m}_hi", f[f"{s}/{m}"])}
                  for m in metrics if f"{s}/{m}" in f} for s in systems}
    rows = [[esc(s)] + [interval(f.get(f"{s}/{m}"), f.get(f"{s}/{m}_lo"), f.get(f"{s}/{m}_hi")) for m in metrics] for s in systems]
    return (img(plots.interval_bars(metrics, series, "retrieval on the test queries (embedder = dense)", "score"), "retrieval")
            + table(["system", *metrics], rows))


def vl_section(ev: dict[str, Any]) -> str:
    rows = ev["vl"]["tasks"]
    if not rows:
        return "<p class='absent'>No vision-language member.</p>"
    f = ev["figures"]
    tasks = [r["task"] for r in rows]
    series = {name: {t: {"value": f[f"vl/{fig}/{t}"], "lo": f.get(f"vl/{fig}_lo/{t}", f[f"vl/{fig}/{t}"]),
                         "hi": f.get(f"vl/{fig}_hi/{t}", f[f"vl/{fig}/{t}"])} for t in tasks if f"vl/{fig}/{t}" in f}
              for name, fig in (("vl", "acc"), ("blind (another image)", "blind_acc"), ("swap", "swap_acc"))}
    majority = {t: f[f"vl/majority_acc/{t}"] for t in tasks if f"vl/majority_acc/{t}" in f}
    return img(plots.interval_bars(tasks, series, "VL against blind on the test images", "accuracy", majority,
                                   "most common answer"), "vl vs blind")


def curves_section(ev: dict[str, Any]) -> str:
    out = []
    for stage, c in ev["curves"].items():
        out.append(f"<h3>{esc(stage)} <span class='note'>(from {esc(c['source'])})</span></h3>")
        out.append(img(plots.curves_plot(stage, c["series"]), f"{stage} curves"))
    return "".join(out) or "<p class='absent'>No training curves recorded.</p>"


def funnel_section(ev: dict[str, Any]) -> str:
    fn = ev["funnel"]
    if not fn["steps"]:
        return "<p class='absent'>No data stages in this recipe.</p>"
    out = [img(plots.funnel_plot(fn["steps"]), "data funnel")] if any(s.get("docs") for s in fn["steps"]) else []
    tokens = [s for s in fn["steps"] if s.get("tokens")]
    if tokens:
        out.append(f"<p>{tokens[0]['tokens']:,} train tokens after tokenization.</p>")
    if fn["drops"]:
        out.append(table(["stage", "reason", "documents"], [[esc(d["stage"]), esc(d["reason"]), d["docs"]] for d in fn["drops"]]))
    return "".join(out)


def cards_section(ev: dict[str, Any]) -> str:
    out = []
    for c in ev["cards"]:
        h = c["headline"]
        size = (f"{c['params']:,} parameters, " if c["params"] else "") + (f"{c['bytes'] / 1e6:.2f} MB of weights" if c["bytes"] else "")
        tasks = ", ".join(f"{t} {v['acc']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}]" for t, v in sorted(c["tasks"].items()))
        head = (f"{h['figure']} {interval(h['value'], h['lo'], h['hi'])} on {h['split']} (baseline {h.get('baseline_name', '')} "
                f"{num(h.get('baseline'))})") if h else "no test figure"
        ex = "".join(f"<li>{esc(e['prompt'])} &rarr; <code>{esc(e['completion'][:80])}</code> "
                     f"({'right' if e['correct'] else 'wrong; reference ' + esc(e['answer'])})</li>" for e in c["examples"])
        out.append(f"<div class='card'><h3>{esc(c['member'])}: {esc(c['what'])}</h3>"
                   f"<p class='note'>stage {esc(c['stage'])}, artifact {esc(c['fingerprint'])}"
                   f"{', from ' + esc(c['from']) if c['from'] else ''}</p><ul>"
                   f"<li><b>size</b>: {esc(size or 'not recorded')}</li><li><b>data</b>: {esc(c['data'])}</li>"
                   f"<li><b>training</b>: {esc(c['training'])}</li><li><b>test</b>: {esc(head)}"
                   f"{'<br>per task: ' + esc(tasks) if tasks else ''}</li>"
                   f"<li><b>limits</b>:<ul>{''.join(f'<li>{esc(x)}</li>' for x in c['limits'])}</ul></li>"
                   f"{'<li><b>examples</b>:<ul>' + ex + '</ul></li>' if ex else ''}</ul></div>")
    return "".join(out)


def decontam_section(ev: dict[str, Any]) -> str:
    rows = ev.get("decontam") or []
    if not rows:
        return "<p class='note'>no decontamination table (the prompts are not from the instruct stage)</p>"
    body = [[esc(r["split"]), esc(r["task"]), esc(r["train_set"]), r["examples"], "-" if r["exact"] is None else r["exact"],
             "-" if r["key"] is None else r["key"], f"{r['ngram13']} ({r['ngram13'] / max(1, r['examples']):.0%})"]
            for r in rows]
    return ("<p>Every held-out example (val and test, per task) against every train set: the same prompt (exact), the "
            "same problem (equivalence key), and any shared 13-gram of words. Exact and key overlaps are 0 by "
            "construction; 13-grams count shared template phrasing too, and closed-book docqa recalls the corpus by "
            "design.</p>" + table(["split", "task", "train set", "examples", "exact", "key", "13-gram"], body))


def lm_eval_section(ev: dict[str, Any]) -> str:
    le = ev.get("lm_eval") or {}
    if not le:
        return "<p class='note'>not run (lm_eval_prompts and lm_eval_docs are 0, or lm-eval is not installed)</p>"
    rows = []
    if "lm_eval/agreement" in le:
        rows.append(["greedy answers on the chat model's test prompts", f"{int(le['lm_eval/prompts'])} prompts",
                     f"agreement {le['lm_eval/agreement']:.3f}; accuracy lm-eval {le['lm_eval/acc']:.3f}, ours {le['lm_eval/our_acc']:.3f}"])
    if "lm_eval/bpb" in le:
        rows.append(["rolling log-likelihood of held-out documents (base model)", f"{int(le['lm_eval/docs'])} documents",
                     f"bpb lm-eval {le['lm_eval/bpb']:.4f}, ours {le['lm_eval/our_bpb']:.4f} (relative difference {le['lm_eval/bpb_rel_diff']:.2e})"])
    return ("<p>EleutherAI's lm-evaluation-harness on the members' HF exports, with a local task over the same rows "
            "(stages/chat/lm_eval_check.py).</p>" + table(["check", "on", "result"], [[esc(a), esc(b), esc(c)] for a, b, c in rows]))


def pairs_section(ev: dict[str, Any]) -> str:
    rows = []
    for r in ev.get("pairs", []):
        base = r["baseline_key"]
        d, half = r[f"gain_over_{base}"], r[f"gain_over_{base}_ci95"]
        rows.append([esc(r["member"]), esc(r["pairs"]), str(r["n"]), interval(r["acc"], r["acc_lo"], r["acc_hi"]),
                     f"{esc(r['baseline'])} {num(r[base])}", f"{d:+.3f} [{d - half:+.3f}, {d + half:+.3f}]"])
    if not rows:
        return "<p class='absent'>No test preference pairs measured (no prefs, reward model or DPO model).</p>"
    return ("<p>Pairwise accuracy on the test preference pairs (a tie counts half), per kind of rejected reply: "
            "near_miss (the right work, a wrong result) and slip (a slip inside the work that every later step "
            "follows).</p>" + table(["member", "pairs", "n", "accuracy [95%]", "baseline", "difference [95%]"], rows))


def recorded_section(ev: dict[str, Any]) -> str:
    rows = [[esc(name), esc(k), num(v)] for name, figs in ev["recorded"].items() for k, v in figs.items()]
    return table(["member", "figure (as its stage recorded it)", "value"], rows) if rows else ""


def render(ev: dict[str, Any]) -> str:
    sections = [("Promotion gates", gates_section), ("Headline: every member on the test split", headline_section),
                ("Paired deltas along the lineage", deltas_section), ("Preference pairs (test)", pairs_section),
                ("Chat line: accuracy per task", accuracy_section),
                ("Quantization", quant_section), ("Retrieval", retrieval_section), ("Vision-language", vl_section),
                ("A third-party evaluator (lm-eval)", lm_eval_section), ("Decontamination", decontam_section),
                ("Training curves", curves_section), ("Data funnel", funnel_section), ("Model cards", cards_section),
                ("Recorded by the members' stages (not test)", recorded_section)]
    body = "".join(f"<h2>{esc(title)}</h2>{fn(ev)}" for title, fn in sections)
    p = ev["prompts"]
    intro = (f"<p>Evaluate artifact {esc(ev['fingerprint'])}. Test split: {p['rows']} "
             f"prompts ({esc(', '.join(f'{t} {n}' for t, n in p['per_task'].items()))}), {p['conversations']} conversations. "
             f"Intervals are 95%; p-values are McNemar's exact test on the same prompts.</p>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>family report</title>"
            f"<style>{STYLE}</style></head><body><h1>Family report</h1>{intro}{body}</body></html>")


def text_summary(ev: dict[str, Any]) -> str:
    lines = [f"family report (evaluate {ev['fingerprint']}), test split: {ev['prompts']['rows']} prompts"]
    for h in ev["headline"]:
        lines.append(f"  {h['member']:<11} {h['figure']:<9} {interval(h['value'], h['lo'], h['hi'])}  "
                     f"baseline {num(h.get('baseline'))} ({h.get('baseline_name', '')})")
    absent = [m for m, s in ev["members"].items() if s["status"] == "absent"]
    if absent:
        lines.append(f"  absent: {', '.join(absent)}")
    if ev["deltas"]:
        lines.append("paired deltas:")
        for d in ev["deltas"]:
            p = f"  p={d['p']:.3g}" if plots.finite(d.get("p")) else ""
            lines.append(f"  {d['from']:>8} -> {d['to']:<10} {d['figure']:<9} {interval(d['delta'], d.get('lo'), d.get('hi'), '+.3f')}{p}")
    le = ev.get("lm_eval") or {}
    if le:
        lines.append("lm-eval: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in le.items()
                                           if k in ("lm_eval/agreement", "lm_eval/bpb_rel_diff")))
    if ev["gates"]:
        lines.append("gates:")
        lines += [f"  {'PASS' if g['passed'] else 'FAIL'} {gate_line(g)}{'  ' + g['note'] if g['note'] else ''}" for g in ev["gates"]]
    return "\n".join(lines)


def markdown_summary(ev: dict[str, Any]) -> str:
    lines = [f"Every member on the test split ({ev['prompts']['rows']} prompts), 95% intervals.", "",
             "| member | figure | value [95%] | baseline |", "|---|---|---|---|"]
    lines += [f"| {h['member']} | {h['figure']} | {interval(h['value'], h['lo'], h['hi'])} | {num(h.get('baseline'))} "
              f"({h.get('baseline_name', '')}) |" for h in ev["headline"]]
    if ev["gates"]:
        lines += ["", "| gate | result |", "|---|---|"]
        lines += [f"| {gate_line(g)} | {'pass' if g['passed'] else 'FAIL ' + g['note']} |" for g in ev["gates"]]
    return "\n".join(lines)
