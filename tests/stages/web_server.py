"""A real HTTP server on 127.0.0.1 for the crawl tests: routes set per test, every request logged."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/html; charset=utf-8"})
    delay_s: float = 0.0  # sleep before answering (a hanging server)
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes


def html_page(*links: str, text: str = "") -> Reply:
    anchors = "".join(f'<a href="{h}">{h}</a>\n' for h in links)
    return Reply(body=f"<html><body><p>{text}</p>\n{anchors}</body></html>".encode())


class SiteServer:
    """`routes` maps a path to a Reply, or to a callable(n) -> Reply with n = times asked so far."""

    def __init__(self, routes: dict[str, Reply | Callable[[int], Reply]]):
        self.routes = routes
        self.log: list[tuple[float, str]] = []  # (monotonic time, path) of every request
        self.hosts: list[str] = []  # the Host header of every request
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    n = sum(1 for _, p in server.log if p == self.path)
                    server.log.append((time.monotonic(), self.path))
                    server.hosts.append(self.headers.get("Host", ""))
                route = server.routes.get(self.path)
                reply = route(n) if callable(route) else route or Reply(404, b"not found", {"Content-Type": "text/plain"})
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    if reply.send_length:
                        self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):  # the crawler gave up first
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # do not wait for a handler still sleeping in a hang test
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [p for _, p in self.log]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
