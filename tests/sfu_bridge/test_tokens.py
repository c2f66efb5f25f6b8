"""Bearer tokens: issue/verify, 401/403 failures, and the `auralink token` CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from cluster.cli import main as cli_main
from sfu_bridge.hint_auth import derive_stream_key
from sfu_bridge.tokens import (
    Scope,
    TokenAuthority,
    TokenError,
    TokenFailure,
)

SECRET = b"token-test-secret-0123456789abcdef"
NOW = 1_800_000_000.0


@pytest.fixture()
def authority() -> TokenAuthority:
    return TokenAuthority(SECRET)


def _fail(fn, *args, **kwargs) -> TokenError:
    with pytest.raises(TokenError) as err:
        fn(*args, **kwargs)
    return err.value


def test_issue_verify_and_compact_format(authority):
    tok = authority.issue("alice", "room-1", [Scope.PUBLISH, "subscribe"], ttl_s=60, now=NOW)
    prefix, claims, sig = tok.split(".")
    assert prefix == "al1" and "=" not in tok
    body = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert body == {"e": int(NOW) + 60, "s": "room-1", "sc": ["publish", "subscribe"], "u": "alice"}
    t = authority.authorize(tok, Scope.PUBLISH, "room-1", now=NOW + 59)
    assert (t.user, t.stream, t.expires_at) == ("alice", "room-1", int(NOW) + 60)
    assert t.scopes == frozenset({Scope.PUBLISH, Scope.SUBSCRIBE})


def test_signature_uses_a_key_separate_from_the_raw_secret(authority):
    tok = authority.issue("alice", "room-1", ["publish"], now=NOW)
    prefix, claims, sig = tok.split(".")
    raw = base64.urlsafe_b64encode(hmac.digest(SECRET, f"{prefix}.{claims}".encode(), "sha256"))
    assert sig != raw.rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token, failure, message",
    [
        (None, TokenFailure.MISSING, "missing bearer token"),
        ("", TokenFailure.MISSING, "missing bearer token"),
        ("abc", TokenFailure.MALFORMED, "malformed token: expected 'al1.<claims>.<signature>'"),
        ("al2.x.y", TokenFailure.MALFORMED, "malformed token: expected 'al1.<claims>.<signature>'"),
        ("x" * 5000, TokenFailure.MALFORMED, "malformed token: too long or not ASCII text"),
        ("al1.\u00e9t\u00e9.sig", TokenFailure.MALFORMED, "malformed token: too long or not ASCII text"),
        ("al1.e30.\u00e9", TokenFailure.MALFORMED, "malformed token: too long or not ASCII text"),
        ("al1.\udcc3\udca9.x", TokenFailure.MALFORMED, "malformed token: too long or not ASCII text"),
        ("al1.eyJ1IjoiYSJ9.AAAA", TokenFailure.BAD_SIGNATURE, "token signature does not verify"),
    ],
)
def test_401_failures(authority, token, failure, message):
    err = _fail(authority.verify, token, now=NOW)
    assert (err.failure, err.status, str(err)) == (failure, 401, message)


def test_tampered_and_foreign_tokens(authority):
    tok = authority.issue("alice", "room-1", ["subscribe"], now=NOW)
    p, c, s = tok.split(".")
    forged_claims = base64.urlsafe_b64encode(b'{"e":9999999999,"s":"room-1","sc":["operator"],"u":"alice"}')
    err = _fail(authority.verify, f"{p}.{forged_claims.decode().rstrip('=')}.{s}", now=NOW)
    assert err.failure is TokenFailure.BAD_SIGNATURE
    other = TokenAuthority(b"another-secret-another-secret").issue("alice", "room-1", ["subscribe"], now=NOW)
    assert _fail(authority.verify, other, now=NOW).status == 401


def test_expired(authority):
    tok = authority.issue("alice", "room-1", ["publish"], ttl_s=10, now=NOW)
    err = _fail(authority.verify, tok, now=NOW + 10)
    assert (err.failure, err.status, str(err)) == (TokenFailure.EXPIRED, 401, "token expired")


def test_403_wrong_scope_and_stream(authority):
    tok = authority.issue("bob", "room-1", ["subscribe"], now=NOW)
    err = _fail(authority.authorize, tok, Scope.PUBLISH, "room-1", now=NOW)
    assert (err.failure, err.status, str(err)) == (TokenFailure.WRONG_SCOPE, 403, "token lacks the 'publish' scope")
    err = _fail(authority.authorize, tok, Scope.SUBSCRIBE, "room-2", now=NOW)
    assert (err.failure, err.status, str(err)) == (TokenFailure.WRONG_STREAM, 403, "token is for another stream")
    op = authority.issue("ops", "*", ["operator"], now=NOW)
    assert authority.authorize(op, Scope.OPERATOR, "any-room", now=NOW).user == "ops"


def test_authorization_header(authority):
    tok = authority.issue("alice", "room-1", ["publish"], now=NOW)
    assert authority.authorize_header(f"Bearer {tok}", Scope.PUBLISH, "room-1", now=NOW).user == "alice"
    assert _fail(authority.authorize_header, None, Scope.PUBLISH).failure is TokenFailure.MISSING
    err = _fail(authority.authorize_header, f"Basic {tok}", Scope.PUBLISH)
    assert (err.status, str(err)) == (401, "Authorization header is not 'Bearer <token>'")


def test_signed_but_unreadable_claims_are_malformed(authority):
    claims = base64.urlsafe_b64encode(b'{"u":"a"}').decode().rstrip("=")
    key = authority._key
    sig = base64.urlsafe_b64encode(hmac.new(key, f"al1.{claims}".encode(), hashlib.sha256).digest())
    err = _fail(authority.verify, f"al1.{claims}.{sig.decode().rstrip('=')}", now=NOW)
    assert (err.failure, str(err)) == (TokenFailure.MALFORMED, "malformed token claims")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(user="", stream="s", scopes=["publish"]), "user and stream must be non-empty"),
        (dict(user="u", stream="s", scopes=[]), "a token needs at least one scope"),
        (dict(user="u", stream="s", scopes=["publish"], ttl_s=0), "ttl must be positive, got 0"),
    ],
)
def test_issue_rejections(authority, kwargs, message):
    with pytest.raises(ValueError) as err:
        authority.issue(**kwargs)
    assert str(err.value) == message


def test_cli_prints_a_verifiable_token_and_hint_key(monkeypatch, capsys):
    monkeypatch.delenv("AURALINK_SECRET_FILE", raising=False)
    monkeypatch.setenv("AURALINK_SECRET", SECRET.decode())
    rc = cli_main(["token", "--user", "u1", "--stream", "s1", "--scope", "publish", "--ttl", "60", "--hint-key"])
    assert rc == 0
    token, key = capsys.readouterr().out.split()
    assert TokenAuthority(SECRET).authorize(token, Scope.PUBLISH, "s1").user == "u1"
    assert bytes.fromhex(key) == derive_stream_key(SECRET, "s1")


def test_cli_finds_the_secret_file_the_starting_commands_create(monkeypatch, capsys, tmp_path):
    from auth.secret import provision_secret

    monkeypatch.delenv("AURALINK_SECRET", raising=False)
    monkeypatch.delenv("AURALINK_SECRET_FILE", raising=False)
    monkeypatch.setenv("AURALINK_RUN_DIR", str(tmp_path / "runs"))
    started = {"AURALINK_RUN_DIR": str(tmp_path / "runs")}  # what `auralink up` saw
    path = provision_secret("auralink up", started)
    capsys.readouterr()
    assert cli_main(["token", "--user", "ops", "--stream", "*", "--scope", "operator"]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenAuthority(path.read_bytes().strip()).authorize(token, Scope.OPERATOR).user == "ops"


def test_cli_without_any_secret_says_what_to_set(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("AURALINK_SECRET", raising=False)
    monkeypatch.delenv("AURALINK_SECRET_FILE", raising=False)
    monkeypatch.setenv("AURALINK_RUN_DIR", str(tmp_path / "empty"))
    assert cli_main(["token", "--user", "ops", "--stream", "*", "--scope", "operator"]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # no token, in particular none under a built-in secret
    assert "no cluster secret" in out.err and "Set AURALINK_SECRET_FILE" in out.err
    assert str(tmp_path / "empty" / "cluster-secret") in out.err
