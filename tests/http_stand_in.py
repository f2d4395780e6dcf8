"""A stand-in HTTP server for tests of what the client and the checkpoint downloads do with
answers no real CryoLens server gives: a ``ThreadingHTTPServer`` on a free port of 127.0.0.1,
in a thread of the test process."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not log each request to stderr."""

    def log_message(self, *args) -> None:
        pass


class LocalHTTPServer:
    """Serves ``handler`` (a :class:`QuietHandler` subclass) at ``url`` between ``__enter__``
    and ``__exit__``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
