"""The cluster secret: where it comes from, and a random one when none is configured.

Every token key (`auth.tokens`) and hint key (`sfu_bridge.hint_auth`) is derived from one
cluster secret. It comes from, in this order:

1. ``AURALINK_SECRET``       the secret itself (at least 16 bytes);
2. ``AURALINK_SECRET_FILE``  the path of a file holding it (surrounding whitespace ignored),
                             readable by its owner (and group) only.

There is no built-in secret. The commands that start things (`auralink up`, `simulate`,
`bridge`) call `provision_secret()`: with neither variable set, it creates a random 256-bit
secret in ``<run dir>/cluster-secret`` (mode 0600; the run dir is ``$AURALINK_RUN_DIR``,
default ``./runs``), or reuses the one already there, says on the console WHERE it is (never
what it is), and sets ``AURALINK_SECRET_FILE`` to that path for the processes they start.
`auralink token` looks in the same place when no variable is set. Everything else that finds
no secret refuses to authenticate (`SecretUnavailable`); nothing falls back to a constant.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

SECRET_ENV = "AURALINK_SECRET"
SECRET_FILE_ENV = "AURALINK_SECRET_FILE"
RUN_DIR_ENV = "AURALINK_RUN_DIR"
DEFAULT_RUN_DIR = "runs"
SECRET_FILE_NAME = "cluster-secret"
MIN_SECRET_BYTES = 16
GENERATED_SECRET_BYTES = 32  # 256 bits, stored as 64 hex characters


class SecretUnavailable(ValueError):
    """No usable cluster secret: none configured, unreadable, too loose or too short."""


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def run_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where commands keep their run output: ``$AURALINK_RUN_DIR``, else ``./runs``."""
    return Path(_env(environ).get(RUN_DIR_ENV) or DEFAULT_RUN_DIR).absolute()


def default_secret_file(environ: Mapping[str, str] | None = None) -> Path:
    """The secret file `provision_secret` creates and `auralink token` looks for."""
    return run_dir(environ) / SECRET_FILE_NAME


def secret_source(environ: Mapping[str, str] | None = None) -> str:
    """Where `load_secret` takes the secret from, for logs (never the secret itself)."""
    env = _env(environ)
    if env.get(SECRET_ENV):
        return SECRET_ENV
    if env.get(SECRET_FILE_ENV):
        return f"{SECRET_FILE_ENV}={env[SECRET_FILE_ENV]}"
    return "none"


def _read_secret_file(path: Path, source: str) -> bytes:
    try:
        st = path.stat()
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise SecretUnavailable(f"cannot read {source}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXO):
        # Anyone on the machine could read (or replace) it: as good as a public secret.
        raise SecretUnavailable(
            f"{source} is accessible to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    return secret


def load_secret(environ: Mapping[str, str] | None = None, *, fallback_file: Path | None = None) -> bytes:
    """The cluster secret from ``$AURALINK_SECRET``, else ``$AURALINK_SECRET_FILE``, else
    `fallback_file` if given and present; `SecretUnavailable` otherwise."""
    env = _env(environ)
    if env.get(SECRET_ENV):
        secret, source = env[SECRET_ENV].encode("utf-8"), SECRET_ENV
    elif env.get(SECRET_FILE_ENV):
        source = f"{SECRET_FILE_ENV}={env[SECRET_FILE_ENV]}"
        secret = _read_secret_file(Path(env[SECRET_FILE_ENV]), source)
    elif fallback_file is not None and fallback_file.exists():
        source = str(fallback_file)
        secret = _read_secret_file(fallback_file, source)
    else:
        looked = f", and no {fallback_file}" if fallback_file is not None else ""
        raise SecretUnavailable(
            f"no cluster secret: {SECRET_ENV} (the secret) and {SECRET_FILE_ENV} (a file holding "
            f"it) are unset{looked}"
        )
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretUnavailable(
            f"secret from {source} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} required"
        )
    return secret


def write_secret_file(path: Path, secret: bytes) -> None:
    """Write `secret` to a new file readable by its owner only (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")


def provision_secret(
    command: str,
    environ: MutableMapping[str, str] | None = None,
    console: TextIO | None = None,
) -> Path | None:
    """For a command that starts things: make sure a cluster secret is configured.

    ``AURALINK_SECRET`` or ``AURALINK_SECRET_FILE`` set: checked and kept (returns the file's
    path, or None for the env value). Neither: creates ``<run dir>/cluster-secret`` (random,
    0600) unless it exists, sets ``AURALINK_SECRET_FILE`` in `environ` (default: this
    process's environment, which the processes it starts inherit), says where on `console`
    (default stderr), and returns the path. Raises `SecretUnavailable` for an unusable one.
    """
    env = os.environ if environ is None else environ
    out = sys.stderr if console is None else console
    if env.get(SECRET_ENV):
        load_secret(env)
        return None
    if env.get(SECRET_FILE_ENV):
        load_secret(env)
        return Path(env[SECRET_FILE_ENV])
    path = default_secret_file(env)
    try:
        write_secret_file(path, secrets.token_bytes(GENERATED_SECRET_BYTES).hex().encode("ascii"))
        verb = "created a random cluster secret in"
    except FileExistsError:
        verb = "using the cluster secret in"
    env[SECRET_FILE_ENV] = str(path)
    load_secret(env)
    print(
        f"{command}: {verb} {path} (mode 0600; no {SECRET_ENV} or {SECRET_FILE_ENV} was set).\n"
        f"{command}: `auralink token` run from this folder finds it; elsewhere set "
        f"{SECRET_FILE_ENV}={path}",
        file=out, flush=True,
    )
    return path
