"""``server/protocol.py`` (uvicorn's httptools protocol with a header size limit) against
uvicorn's own protocol, in-process over a recording transport: for generated requests cut into
generated pieces, a request whose line and headers fit the limit is answered byte for byte as
uvicorn answers it, and one over the limit is answered 431, however its bytes arrive."""
from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("httptools")

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from cryolens.server import protocol  # noqa: E402


class Transport(asyncio.Transport):
    """Records what the protocol writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.closed = b"", False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8023)}.get(
            name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _app(scope, receive, send) -> None:
    headers = [(b"x-seen", str(len(scope["headers"])).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


def _answer(kind: type, pieces: list[bytes]) -> bytes:
    async def run() -> bytes:
        config = uvicorn.Config(_app, log_level="critical", server_header=False,
                                date_header=False)
        config.load()
        proto = kind(config=config, server_state=ServerState(), app_state={},
                     _loop=asyncio.get_running_loop())
        transport = Transport()
        proto.connection_made(transport)
        for piece in pieces:
            if transport.closed:
                break
            proto.data_received(piece)
        for _ in range(5):  # the app's task runs
            await asyncio.sleep(0)
        proto.connection_lost(None)
        return transport.written

    return asyncio.run(run())


_NAME = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=16).map(lambda s: "x" + s)
_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=300)


@st.composite
def requests(draw) -> tuple[bytes, int]:
    """(a GET's bytes, the length of its line and headers as the limit counts them)."""
    path = "/" + draw(st.text("abcdefghij", max_size=200))
    headers = draw(st.lists(st.tuples(_NAME, _VALUE), max_size=12))
    head = f"GET {path} HTTP/1.1\r\nhost: x\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    counted = len(path) + protocol._LINE_OVERHEAD + sum(
        len(n) + len(v) + protocol._FIELD_OVERHEAD for n, v in [("host", "x"), *headers])
    return head.encode(), counted


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=150, deadline=None)
@given(request=requests(), cuts=st.lists(st.integers(0, 10**4), max_size=30),
       limit=st.integers(64, 4096))
def test_within_the_limit_as_uvicorn_answers_over_it_431(request, cuts, limit):
    data, counted = request
    limited = protocol.configured(10, limit, 30, 0)
    ours = _answer(limited, _pieces(data, cuts))
    if len(data) <= limit:  # raw bytes: what a dribble is counted by before it is complete
        assert ours == _answer(HttpToolsProtocol, [data])
        assert ours.startswith(b"HTTP/1.1 200 ")
    elif counted > limit:
        assert ours.startswith(b"HTTP/1.1 431 "), ours[:60]
