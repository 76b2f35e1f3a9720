"""Supporting modules of the evaluate stage (not stages themselves): what the family report is made of.

recorded.py  what the members' own stages published (result.json, config.json beside each output):
             the data funnel, retrieval and vl figures with their intervals, training curves, weights
cards.py     one model card per member: params, data, training, test figures, limits
gates.py     the promotion gates: rules per member checked against the figures
plots.py     the report's figures with matplotlib (Agg), as base64 PNG
html.py      report.html (self-contained: no external script, style or image), summary.txt, markdown
"""
