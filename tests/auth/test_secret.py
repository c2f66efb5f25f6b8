"""The cluster secret: where it is read from, the 0600 file commands create, and no fallback."""

from __future__ import annotations

import io
import stat

import pytest

from auth.secret import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    SecretUnavailable,
    default_secret_file,
    load_secret,
    provision_secret,
)

# The development secret earlier versions fell back to, printed in their source code.
FORMER_DEV_SECRET = b"auralink-dev-secret-do-not-use-in-production"


def _private(path, data: bytes):
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_env_value_then_file(tmp_path):
    assert load_secret({SECRET_ENV: "s" * 16}) == b"s" * 16
    f = _private(tmp_path / "secret", b"file-secret-0123456789\n")
    assert load_secret({SECRET_FILE_ENV: str(f)}) == b"file-secret-0123456789"
    assert load_secret({SECRET_ENV: "e" * 16, SECRET_FILE_ENV: str(f)}) == b"e" * 16


@pytest.mark.parametrize("environ, message", [
    ({SECRET_ENV: "short"}, "secret from AURALINK_SECRET is 5 bytes; at least 16 required"),
    ({SECRET_FILE_ENV: "/nonexistent/secret"}, "cannot read AURALINK_SECRET_FILE=/nonexistent/secret"),
    ({}, "no cluster secret: AURALINK_SECRET (the secret) and AURALINK_SECRET_FILE"),
])
def test_no_usable_secret_is_an_error_never_a_constant(environ, message):
    with pytest.raises(SecretUnavailable, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_secret(environ)


def test_a_file_other_users_can_read_is_refused(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(b"file-secret-0123456789")
    f.chmod(0o644)
    with pytest.raises(SecretUnavailable, match=r"accessible to other users \(mode 0644\); run `chmod 600"):
        load_secret({SECRET_FILE_ENV: str(f)})


def test_fallback_file_only_when_nothing_is_set(tmp_path):
    f = _private(tmp_path / "cluster-secret", b"f" * 64)
    assert load_secret({}, fallback_file=f) == b"f" * 64
    assert load_secret({SECRET_ENV: "e" * 16}, fallback_file=f) == b"e" * 16
    with pytest.raises(SecretUnavailable, match="and no .*missing"):
        load_secret({}, fallback_file=tmp_path / "missing")


def test_provision_creates_a_private_random_secret_and_says_where(tmp_path):
    env = {"AURALINK_RUN_DIR": str(tmp_path / "runs")}
    console = io.StringIO()
    path = provision_secret("auralink up", env, console)
    assert path == default_secret_file(env) == tmp_path / "runs" / "cluster-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = load_secret(env)
    assert len(secret) == 64 and bytes.fromhex(secret.decode())  # 256 random bits, hex
    assert secret != FORMER_DEV_SECRET
    assert env[SECRET_FILE_ENV] == str(path)  # what the started processes inherit: a path
    said = console.getvalue()
    assert str(path) in said and "created a random cluster secret" in said
    assert secret.decode() not in said

    # The next command started from the same folder joins the same cluster secret.
    again_env = {"AURALINK_RUN_DIR": str(tmp_path / "runs")}
    again = io.StringIO()
    assert provision_secret("auralink bridge", again_env, again) == path
    assert load_secret(again_env) == secret and "using the cluster secret in" in again.getvalue()

    # Another run folder: another random secret.
    other_env = {"AURALINK_RUN_DIR": str(tmp_path / "other")}
    provision_secret("auralink simulate", other_env, io.StringIO())
    assert load_secret(other_env) != secret


def test_provision_keeps_a_configured_secret(tmp_path):
    env = {SECRET_ENV: "configured-secret-0123", "AURALINK_RUN_DIR": str(tmp_path)}
    assert provision_secret("auralink up", env, io.StringIO()) is None
    assert SECRET_FILE_ENV not in env and not (tmp_path / "cluster-secret").exists()
    f = _private(tmp_path / "mine", b"file-secret-0123456789")
    env = {SECRET_FILE_ENV: str(f), "AURALINK_RUN_DIR": str(tmp_path)}
    assert provision_secret("auralink up", env, io.StringIO()) == f
    assert not (tmp_path / "cluster-secret").exists()
    with pytest.raises(SecretUnavailable):
        provision_secret("auralink up", {SECRET_ENV: "short"}, io.StringIO())
