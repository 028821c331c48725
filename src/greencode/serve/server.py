"""Running the endpoint: ``serve`` (uvicorn in this process) and ``ServerProcess`` (a real
server in a child process on a free local port, for the benchmark and the tests)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from greencode.config import ConfigError
from greencode.serve.app import API_KEY_ENV, create_app
from greencode.utils import REPO_ROOT

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg, run_dir: Optional[Union[str, Path]] = None, *, host: Optional[str] = None, port: Optional[int] = None,
          allow_no_key: bool = False, log_level: str = "info") -> None:
    """Load the run and serve it with uvicorn until interrupted. Binding anything but a
    loopback address needs an API key (``serve.api_key`` or ``GREENCODE_API_KEY``) unless
    ``allow_no_key``."""
    import uvicorn

    host = host or cfg.serve.host
    port = cfg.serve.port if port is None else int(port)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range [0, 65535]")
    if not is_loopback(host) and not (cfg.serve.api_key or os.environ.get(API_KEY_ENV)) and not allow_no_key:
        raise ConfigError(f"binding {host!r} exposes the model beyond this machine without an API key; set "
                          f"{API_KEY_ENV} (or serve.api_key), or pass --allow-no-key if that is really intended")
    app = create_app(cfg, run_dir)
    info = app.state.engine.describe()
    print(f"GREEN-CODE endpoint: http://{host}:{port}  model {cfg.serve.model_name!r} ({info['family']}, "
          f"{info['num_layers']} layers, exits {info['exit_layers']}) - {info['serving']}; default threshold "
          f"{cfg.serve.default_threshold}, energy: {info['energy_source']}", flush=True)
    # no limit_concurrency: uvicorn would answer overload with text/plain 503s; the app bounds requests
    # itself and answers JSON 503 with Retry-After (greencode.serve.app, max_concurrent_requests)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=30)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``scripts/serve.py`` in a child process on a free loopback port; ``url`` once ready.

    Used as a context manager; the child (and only it) is terminated on exit."""

    def __init__(self, config_path: Union[str, Path], overrides: Sequence[str] = (), *,
                 run_dir: Optional[Union[str, Path]] = None, env: Optional[dict] = None,
                 startup_timeout_s: float = 180.0, host: str = "127.0.0.1"):
        self.config_path = str(config_path)
        self.overrides = list(overrides)
        self.run_dir = run_dir
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.host = host
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-n:]

    def start(self) -> "ServerProcess":
        import httpx

        self.port = free_port(self.host)
        cmd = [sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), "--config", self.config_path,
               "--host", self.host, "--port", str(self.port)]
        if self.run_dir is not None:
            cmd += ["--run-dir", str(self.run_dir)]
        cmd += self.overrides
        self._log = tempfile.NamedTemporaryFile("w+", prefix="greencode-serve-", suffix=".log", delete=False)
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {self.startup_timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            try:
                os.unlink(self._log.name)
            except OSError:
                pass
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
