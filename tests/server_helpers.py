"""Start real server processes on free ports for the server tests, and always clean them up."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

#: Seconds a server may take to import torch, load its model and answer /ready.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_on_sigterm() -> None:
    """SIGTERM (from ``timeout``, a CI runner) then raises SystemExit in the main thread, so
    that ``finally: server.stop()`` runs: a server started here is in a process group of its
    own, which the signal does not reach, and would outlive the script (on a GPU machine,
    holding memory while the next measurement runs)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class ServerProcess:
    """A server subprocess: ``url``, ``output()`` (stdout+stderr so far) and ``stop()``."""

    def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="cryolens-server-", suffix=".log", delete=False)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=full_env, cwd=cwd, start_new_session=True)

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_healthy(self, timeout: float = START_TIMEOUT_S, path: str = "/ready"
                     ) -> ServerProcess:
        """Wait until the server answers ``path`` with 200 (ours: /ready, the model loaded and
        warmed up; other servers: their own health check)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n"
                                   f"{self.output()[-3000:]}")
            try:
                if requests.get(self.url + path, timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM the server's process group (uvicorn workers, reloader children), then kill."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 15)
                self.process.wait(STOP_TIMEOUT_S)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, 9)
                except ProcessLookupError:
                    pass
                self.process.wait(STOP_TIMEOUT_S)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def start_cli_server(checkpoint: str | os.PathLike, *extra: str, env: dict[str, str] | None = None,
                     wait: bool = True) -> ServerProcess:
    """``python -m cryolens.server.minimal_cryolens_server --checkpoint X --port P
    --device cpu``."""
    port = free_port()
    server = ServerProcess([PYTHON, "-m", "cryolens.server.minimal_cryolens_server",
                            "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
                            "--port", str(port), "--device", "cpu", *extra], port, env=env)
    return server.wait_healthy() if wait else server


def console_script(name: str, entry: str) -> list[str]:
    """The command for console script ``name`` (``module:function``): the installed script
    beside this Python when there is one, else the same call made by ``python -c``."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    module, function = entry.split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; "
    return [PYTHON, "-c", code + f"sys.exit({function}())"]


def start_command(args: list[str], port: int, env: dict[str, str] | None = None,
                  cwd=None) -> ServerProcess:
    """Start ``args`` (which must bind 127.0.0.1:``port``) and wait until /ready answers."""
    return ServerProcess(args, port, env=env, cwd=cwd).wait_healthy()


def start_uvicorn(checkpoint: str | os.PathLike, *extra: str, cwd=None) -> ServerProcess:
    """``uvicorn cryolens.server.minimal_cryolens_server:app`` configured by CRYOLENS_* only."""
    port = free_port()
    env = {"CRYOLENS_CHECKPOINT": str(checkpoint), "CRYOLENS_DEVICE": "cpu"}
    server = ServerProcess([PYTHON, "-m", "uvicorn", "cryolens.server.minimal_cryolens_server:app",
                            "--host", "127.0.0.1", "--port", str(port), *extra], port, env=env,
                           cwd=cwd)
    return server.wait_healthy()


def small_model_file(path: Path) -> Path:
    """A small random CryoLens model (40 splats, 8 latent dims) as safetensors: fast tests."""
    import torch
    from safetensors.torch import save_file

    from cryolens.model import CryoLensConfig, CryoLensVAE

    torch.manual_seed(0)
    model = CryoLensVAE(CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=32, n_free=8))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "coords" not in k}
    save_file(state, str(path))
    return path


class ServerThread:
    """The app of ``create_app(settings)`` served by uvicorn on a free port of 127.0.0.1, in a
    thread of this process: ``url``, ``port`` and ``stop()`` as for :class:`ServerProcess`.
    For tests that need a server with settings of their own but not a process of its own
    (nothing about start-up, signals, memory of the process or the HTTP protocol's limits):
    it is ready in about a second, where a process imports torch again first."""

    def __init__(self, settings) -> None:
        import threading

        import uvicorn

        from cryolens.server import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name=f"test-server-{self.port}")
        self._thread.start()

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> ServerThread:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the in-process server stopped before it was ready")
            try:
                if requests.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"in-process server not ready after {timeout} s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)


def start_in_process(checkpoint: str | os.PathLike, **settings) -> ServerThread:
    """A :class:`ServerThread` on ``checkpoint`` (CPU) with the given ``Settings`` fields."""
    from cryolens.server import Settings

    return ServerThread(Settings(checkpoint=str(checkpoint), device="cpu", **settings)
                        ).wait_healthy()
