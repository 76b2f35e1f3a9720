"""Imported once by the data stages' forkserver (stages/text/workers.py): the modules and tables every
worker needs, so a forked worker starts with them instead of loading them itself (~1.5 s each)."""
from stages import extract, filter  # noqa: F401 - the workers' modules (trafilatura, lxml, the filters)
from stages.text import minhash  # noqa: F401
from stages.text.normalize import warm_up

extract.language_identifier()
warm_up()
