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
module list is fixed up front (`select_modules`, found without importing anything) and only those
modules (and what they import) are ever imported, each under a time limit.

Pages are deterministic: the same modules on the same Python give the same pages, byte for byte,
whatever the order, concurrency or timing of the requests and the load of the machine.
Earlier versions imported a module when its page was first requested, on 4 render threads, and
two crawls of the tiny corpus (400 modules) gave 413 pages (5 http_404) and 403 pages (15
http_404). The causes (the first two measured, the third read from the code):
- concurrent imports: two render threads importing modules of one package (asyncio, unittest)
  see each other's partially initialised modules: `AttributeError: partially initialized module
  'asyncio.selector_events' has no attribute 'BaseSelectorEventLoop'`, `ImportError: cannot
  import name 'TestProgram' from partially initialized module 'unittest.main'`. The failed import
  leaves its package half set up, so every later page of it fails too (`NameError: name
  'base_events' is not defined` for asyncio, asyncio.unix_events, unittest, unittest.mock, ...).
  Under load (two busy cores) 10 more pages 404'd; at rest the race was rarely lost.
- content that depends on what was imported before: a package's page documents its attributes,
  and importing a submodule rebinds one (importing curses.has_key replaces the function
  curses.has_key with the module, so the curses page lost `has_key` when curses.has_key.html was
  fetched first); the sys page lists sys.modules. Requests in another order gave other bytes.
- the 10 s render limit counted from the request, waiting behind other renders included, so
  on a slow machine any page could become a 504.
Now every page is made before READY, in one thread, in a fixed order: first every selected
module is imported, in sorted order (`import_modules`), then every page is rendered, in sorted
order (`render_pages`), and requests only read the finished pages. A module whose import fails
is recorded at that first attempt and served as the same 404 every time. The time limit
(RENDER_TIMEOUT_S, for an import that hangs rather than one that is slow) applies to each import
and each render on its own (a hung one's thread is left running, so pages after it could again
depend on timing; no module of this Python's selection hangs). Besides, object addresses (`at 0x7f...`) are zeroed, the hash seed is
fixed, and the checkout's and virtual environment's paths (in sys.argv, sys.executable) are
replaced by `<checkout>` and `<venv>`, so a page does not change when the checkout moves.
"""
from __future__ import annotations

import argparse
import contextlib
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
RENDER_TIMEOUT_S = 30.0  # per import and per render: for one that hangs (the slowest render takes ~1 s)
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


def _machine_paths() -> list[tuple[str, str]]:
    """(path, placeholder) for paths of this checkout and virtual environment, longest first."""
    paths = [(str(Path(__file__).resolve().parents[2]), "&lt;checkout&gt;")]
    venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    if venv != os.path.abspath(sys.base_prefix):  # a virtual environment: not part of "this Python"
        paths.append((venv, "&lt;venv&gt;"))
    return sorted(((p, r) for p, r in paths if os.path.dirname(p) != p), key=lambda p: -len(p[0]))  # never "/"


def _stable(text: str) -> str:
    """`text` without what differs between runs or checkouts: object addresses, our own paths."""
    for path, placeholder in _machine_paths():
        text = text.replace(path, placeholder)
    return ADDRESS.sub(r"\g<1>0", text)


def _render_module(name: str) -> str:
    import pydoc  # imported here so that importing this file in the crawl stage stays light

    module = sys.modules[name]  # imported by import_modules
    doc = pydoc.HTMLDoc()
    return _stable(doc.page(pydoc.describe(module), doc.document(module, name)))


def _render_topic(name: str) -> str:
    from pydoc_data.topics import topics

    return _page(f"Python topic: {name}", f"<h1>{html.escape(name)}</h1>\n<pre>{html.escape(topics[name])}</pre>")


def _time_limited(fn, name: str, what: str) -> object:
    """fn(name) run in a thread of its own: its result, or the exception it raised, or a
    TimeoutError after RENDER_TIMEOUT_S (the thread is abandoned: a hung import cannot be stopped)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn(name)
        except BaseException as e:  # SystemExit from a module's import is a failed page, not our exit
            box["value"] = e

    worker = threading.Thread(target=target, name=f"{what}-{name}", daemon=True)
    worker.start()
    worker.join(RENDER_TIMEOUT_S)
    return box.get("value", TimeoutError(f"{what} took over {RENDER_TIMEOUT_S:.0f}s"))


def import_modules(modules: list[str]) -> dict[str, BaseException | None]:
    """Import every module, one at a time in sorted order: name -> the import's exception (None: ok).

    One thread and one order, so a module's page never depends on which pages were asked for first
    (see the module docstring), and a module that fails fails the same way every time.
    """
    errors: dict[str, BaseException | None] = {}
    for name in sorted(modules):
        outcome = _time_limited(importlib.import_module, name, "import")
        errors[name] = outcome if isinstance(outcome, BaseException) else None
    return errors


def _failed(name: str, error: BaseException) -> tuple[int, str]:
    if isinstance(error, TimeoutError):  # an import or render that hangs
        return 504, _page("Timeout", f"<p>{html.escape(name)}: {html.escape(str(error))}</p>")
    # an import that fails on this platform (winreg, _gdbm, ...): no page, not a server fault
    return 404, _page("No documentation", f"<p>{html.escape(name)}: {html.escape(_stable(repr(error)))}</p>")


def render_pages(modules: list[str], topics: list[str]) -> dict[str, tuple[int, bytes]]:
    """Every page, path -> (HTTP status, body): all modules imported first, then each page rendered, in sorted order."""
    errors = import_modules(modules)
    pages: dict[str, tuple[int, bytes]] = {}
    for name in sorted(modules):
        outcome = errors[name] if errors[name] is not None else _time_limited(_render_module, name, "render")
        status, text = _failed(name, outcome) if isinstance(outcome, BaseException) else (200, outcome)
        pages[f"{name}.html"] = (status, text.encode("utf-8", errors="replace"))
    for name in sorted(topics):
        pages[f"topic-{name}.html"] = (200, _render_topic(name).encode("utf-8"))
    return pages


def _make_handler(modules: list[str], topics: list[str], pages: dict[str, tuple[int, bytes]]) -> type[BaseHTTPRequestHandler]:
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
                return self._send(200, index.encode(), "text/html; charset=utf-8")
            if path == "robots.txt":
                return self._send(200, f"User-agent: *\nAllow: /\nSitemap: http://{host}/sitemap.xml\n".encode(), "text/plain; charset=utf-8")
            if path == "sitemap.xml":
                urls = "".join(f"<url><loc>http://{host}/{p}</loc></url>" for p in pages)
                return self._send(200, f'<?xml version="1.0" encoding="UTF-8"?>\n<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{urls}</urlset>\n'.encode(), "application/xml")
            if path in pages:
                return self._send(*pages[path], "text/html; charset=utf-8")
            self._send(404, _page("Not found", f"<p>no page {html.escape(path)}</p>").encode(), "text/html; charset=utf-8")

        def _send(self, status: int, data: bytes, content_type: str) -> None:
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
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # what a module prints must not come before READY
        pages = render_pages(modules, topics)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(modules, topics, pages))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY {server.server_address[1]}", flush=True)
    sys.stdin.read()  # returns when the parent closes our stdin, or dies
    os._exit(0)  # do not wait for a thread stuck in an import


# -- the parent's handle ---------------------------------------------------------------------------


class PydocServer:
    """Starts the server script in a subprocess; a context manager that always stops it.

    The server renders every page before it is ready (~5 s for the 338 modules of the tiny
    corpus on one free core): the start timeout leaves room for a loaded machine.

    with PydocServer(["json", "re"], topics=True) as server:
        server.url  # "http://127.0.0.1:<port>/"
    """

    def __init__(self, modules: list[str], topics: bool, start_timeout_s: float = 300.0):
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
