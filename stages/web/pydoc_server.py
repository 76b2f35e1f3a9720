"""The embedded default corpus: this Python's standard-library documentation, served on 127.0.0.1.

Run as a script (standard library only; the crawl stage starts it with `python -I -S`, so nothing
outside the standard library can even be imported):

    python -I -S stages/web/pydoc_server.py --modules json,os,re [--topics]

it serves, until its stdin closes,

    /                   an index linking every page below
    /robots.txt         allows everything, names the sitemap
    /sitemap.xml        every page below
    /<module>.html      pydoc.HTMLDoc's page for a standard-library module
    /topic-<NAME>.html  a language-reference topic from pydoc_data.topics (with --topics)

and prints "READY <port>" once it listens. Why not `python -m pydoc -p 0`: its index lists every
installed package (site-packages included) and imports whatever page is asked for, so a crawl of
it would import antigravity (which opens a web browser) and anything else it links to. Here the
module list is fixed up front (`select_modules`, found without importing anything) and a module is
imported only when its page is requested, in a worker thread with a time limit.

Pages are made deterministic: object addresses (`at 0x7f...`) are zeroed and the hash seed is
fixed, so fetching the same page twice gives the same bytes and sha256.
"""
from __future__ import annotations

import argparse
import html
import importlib.util
import os
import pkgutil
import re
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# top-level modules not documented: import side effects (antigravity opens a browser, this and
# __hello__ print, idlelib/turtledemo start GUIs), GUI toolkits, the test suite, packaging
# bootstrap, and modules that are deprecated aliases or slated for removal (PEP 594)
SKIP_TOP = frozenset({
    "antigravity", "this", "__hello__", "__phello__", "idlelib", "tkinter", "turtle", "turtledemo",
    "test", "lib2to3", "ensurepip", "pydoc_data", "xxsubtype", "xxlimited", "xxlimited_35",
    "sre_compile", "sre_constants", "sre_parse", "distutils", "imp", "asynchat", "asyncore", "smtpd",
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis",
    "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib",
})
# submodule names never documented: __main__ runs code on import, tests are not documentation
SKIP_PARTS = frozenset({"__main__", "test", "tests", "idle_test"})
# packages whose submodules are generated tables rather than prose (the codecs of encodings)
NO_SUBMODULES = frozenset({"encodings"})
RENDER_TIMEOUT_S = 10.0
# object addresses in reprs: "<object object at 0x7f..>" (a space may be &nbsp;), ctypes "handle 7f.."
ADDRESS = re.compile(r"(\bat(?: |&nbsp;)0x|\bhandle )[0-9a-fA-F]{8,}")


# -- which modules -----------------------------------------------------------------------------------


def _skip(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in SKIP_TOP or any(p in SKIP_PARTS or p.startswith("_") for p in parts)


def _submodules(locations: list[str], prefix: str) -> list[str]:
    names = []
    for info in pkgutil.iter_modules(locations, prefix):  # reads folders, imports nothing
        if _skip(info.name):
            continue
        names.append(info.name)
        if info.ispkg:
            names.extend(_submodules([os.path.join(info.module_finder.path, info.name.rsplit(".", 1)[1])], info.name + "."))
    return names


def stdlib_modules() -> list[str]:
    """Documentable standard-library modules and submodules, sorted, found without importing them."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if _skip(top):
            continue
        spec = importlib.util.find_spec(top)  # for a top-level name this imports nothing
        if spec is None:  # another platform's module (winreg, msvcrt, ...)
            continue
        names.append(top)
        if spec.submodule_search_locations and top not in NO_SUBMODULES:
            names.extend(_submodules(list(spec.submodule_search_locations), top + "."))
    return sorted(names)


def select_modules(requested: tuple[str, ...] | list[str], max_modules: int) -> list[str]:
    """`requested` (checked against the documentable set), else at most `max_modules` of them.

    Top-level modules come first (they hold most of the prose), then submodules; within each group
    the pick is spread evenly over the sorted names, so a small corpus still spans a..z.
    Raises ValueError naming modules that are not documentable standard-library modules.
    """
    available = stdlib_modules()
    if requested:
        unknown = sorted(set(requested) - set(available))
        if unknown:
            raise ValueError(f"not documentable standard-library modules: {', '.join(unknown)}")
        return sorted(set(requested))
    top = [m for m in available if "." not in m]
    subs = [m for m in available if "." in m]
    return sorted(_spread(top, max_modules) + _spread(subs, max_modules - len(top)))


def _spread(names: list[str], n: int) -> list[str]:
    """n names evenly spaced over `names` (all of them when n >= len(names))."""
    if n >= len(names):
        return list(names)
    return [names[i * len(names) // n] for i in range(max(n, 0))]


# -- the server (runs in the subprocess) -----------------------------------------------------------


def _page(title: str, body: str) -> str:
    return f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body></html>\n"


def _render_module(name: str) -> str:
    import pydoc  # imported here so that importing this file in the crawl stage stays light

    module = importlib.import_module(name)
    doc = pydoc.HTMLDoc()
    return ADDRESS.sub(r"\g<1>0", doc.page(pydoc.describe(module), doc.document(module, name)))


def _render_topic(name: str) -> str:
    from pydoc_data.topics import topics

    return _page(f"Python topic: {name}", f"<h1>{html.escape(name)}</h1>\n<pre>{html.escape(topics[name])}</pre>")


def _make_handler(modules: list[str], topics: list[str], pool: ThreadPoolExecutor) -> type[BaseHTTPRequestHandler]:
    module_set, topic_set = set(modules), set(topics)
    pages = [f"{m}.html" for m in modules] + [f"topic-{t}.html" for t in topics]
    index = _page(
        f"Python {sys.version_info.major}.{sys.version_info.minor} standard library",
        "<h1>Modules</h1>\n<ul>\n" + "".join(f'<li><a href="{m}.html">{m}</a></li>\n' for m in modules) + "</ul>\n"
        + ("<h1>Topics</h1>\n<ul>\n" + "".join(f'<li><a href="topic-{t}.html">{t}</a></li>\n' for t in topics) + "</ul>\n" if topics else ""),
    )

    class Handler(BaseHTTPRequestHandler):
        server_version = "family-forge-pydoc/0.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].lstrip("/")
            host = self.headers.get("Host", "127.0.0.1")
            if path in ("", "index.html"):
                return self._send(200, index, "text/html; charset=utf-8")
            if path == "robots.txt":
                return self._send(200, f"User-agent: *\nAllow: /\nSitemap: http://{host}/sitemap.xml\n", "text/plain; charset=utf-8")
            if path == "sitemap.xml":
                urls = "".join(f"<url><loc>http://{host}/{p}</loc></url>" for p in pages)
                return self._send(200, f'<?xml version="1.0" encoding="UTF-8"?>\n<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{urls}</urlset>\n', "application/xml")
            if path.startswith("topic-") and path.endswith(".html") and path[6:-5] in topic_set:
                return self._render(_render_topic, path[6:-5])
            if path.endswith(".html") and path[:-5] in module_set:
                return self._render(_render_module, path[:-5])
            self._send(404, _page("Not found", f"<p>no page {html.escape(path)}</p>"), "text/html; charset=utf-8")

        def _render(self, render, name: str) -> None:
            try:
                text = pool.submit(render, name).result(timeout=RENDER_TIMEOUT_S)
            except FutureTimeout:  # an import that hangs: the worker stays stuck, this request ends
                return self._send(504, _page("Timeout", f"<p>{html.escape(name)} took over {RENDER_TIMEOUT_S}s</p>"), "text/html; charset=utf-8")
            except Exception as e:  # an import that fails on this platform: no page, not a server fault
                return self._send(404, _page("No documentation", f"<p>{html.escape(name)}: {html.escape(repr(e))}</p>"), "text/html; charset=utf-8")
            self._send(200, text, "text/html; charset=utf-8")

        def _send(self, status: int, text: str, content_type: str) -> None:
            data = text.encode("utf-8", errors="replace")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # quiet: the crawler counts
            pass

    return Handler


def serve(modules: list[str], with_topics: bool) -> None:
    import warnings

    warnings.simplefilter("ignore")  # deprecation warnings of documented modules are not ours to show
    topics: list[str] = []
    if with_topics:
        from pydoc_data.topics import topics as all_topics

        topics = sorted(all_topics)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="render")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(modules, topics, pool))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY {server.server_address[1]}", flush=True)
    sys.stdin.read()  # returns when the parent closes our stdin, or dies
    os._exit(0)  # do not wait for a render thread stuck in an import


# -- the parent's handle ---------------------------------------------------------------------------


class PydocServer:
    """Starts the server script in a subprocess; a context manager that always stops it.

    with PydocServer(["json", "re"], topics=True) as server:
        server.url  # "http://127.0.0.1:<port>/"
    """

    def __init__(self, modules: list[str], topics: bool, start_timeout_s: float = 30.0):
        self.modules = modules
        self.topics = topics
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "PydocServer":
        cmd = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--modules", ",".join(self.modules)]
        if self.topics:
            cmd.append("--topics")
        env = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            line = self._ready_line()
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/"
        return self

    def _ready_line(self) -> str:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline().decode()
                if line.startswith("READY "):
                    return line
                break
            if self.proc.poll() is not None:
                break
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
        raise RuntimeError(f"pydoc server did not start within {self.start_timeout_s}s: {err.strip()[-500:]}")

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()  # the server exits when its stdin closes
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="serve standard-library documentation on 127.0.0.1")
    parser.add_argument("--modules", default="", help="comma-separated module names (default: all documentable)")
    parser.add_argument("--topics", action="store_true", help="also serve the language-reference topics")
    args = parser.parse_args()
    serve([m for m in args.modules.split(",") if m] or stdlib_modules(), args.topics)
