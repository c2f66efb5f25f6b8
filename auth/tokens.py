"""Signed bearer tokens for WHIP/WHEP (RFC 9725 section 4.5) and the operator API.

Format (JWT-like, minimal, no external dependency)::

    al1.<claims>.<signature>

``claims`` is base64url (RFC 4648 section 5, no padding) of compact JSON
``{"u": user, "s": stream, "e": expiry (unix seconds), "sc": [scopes]}``; ``signature`` is
base64url of ``HMAC-SHA256(token_key, "al1." + claims)`` with ``token_key`` derived from the
cluster secret by HKDF-SHA256 (info ``auralink token v1``), so a token key never equals a
hint key. ``s`` may be ``*`` (any stream), meant for operator tokens.

Errors are `TokenError` with an HTTP status: 401 for a missing, malformed, badly signed
or expired token; 403 for a valid token without the needed scope or for another stream.

The cluster secret comes from `auth.secret` (``AURALINK_SECRET`` or ``AURALINK_SECRET_FILE``);
there is no built-in one. A token is ASCII by construction: anything else is malformed (401).

CLI: ``auralink token --user U --stream S --scope publish --ttl 3600`` (`sfu_bridge.tokens`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from auth.secret import load_secret

TOKEN_PREFIX = "al1"
MAX_TOKEN_CHARS = 4096
ANY_STREAM = "*"
_HKDF_SALT = b"auralink/token/v1"
_HKDF_INFO = b"auralink token v1"


class Scope(str, enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    OPERATOR = "operator"


class TokenFailure(str, enum.Enum):
    MISSING = "missing"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    WRONG_SCOPE = "wrong_scope"
    WRONG_STREAM = "wrong_stream"


_STATUS = {
    TokenFailure.MISSING: 401,
    TokenFailure.MALFORMED: 401,
    TokenFailure.BAD_SIGNATURE: 401,
    TokenFailure.EXPIRED: 401,
    TokenFailure.WRONG_SCOPE: 403,
    TokenFailure.WRONG_STREAM: 403,
}


class TokenError(Exception):
    """A rejected token; `status` is the HTTP status to answer (401 or 403)."""

    def __init__(self, failure: TokenFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.status = _STATUS[failure]


@dataclass(frozen=True)
class Token:
    user: str
    stream: str
    expires_at: int  # unix seconds
    scopes: frozenset[Scope]

    def allows(self, scope: Scope, stream: str) -> bool:
        return scope in self.scopes and self.stream in (stream, ANY_STREAM)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or not all(c.isalnum() or c in "-_" for c in text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _token_key(secret: bytes) -> bytes:
    if not secret:
        raise ValueError("token secret is empty")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO).derive(secret)


class TokenAuthority:
    """Issues and checks tokens under one cluster secret."""

    def __init__(self, secret: bytes) -> None:
        self._key = _token_key(secret)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TokenAuthority:
        return cls(load_secret(environ))

    def _sign(self, signing_input: str) -> str:
        return _b64encode(hmac.digest(self._key, signing_input.encode("ascii"), "sha256"))

    def issue(
        self,
        user: str,
        stream: str,
        scopes: Iterable[Scope | str],
        ttl_s: float = 3600,
        now: float | None = None,
    ) -> str:
        if not user or not stream:
            raise ValueError("user and stream must be non-empty")
        if ttl_s <= 0:
            raise ValueError(f"ttl must be positive, got {ttl_s}")
        scope_list = sorted({Scope(s).value for s in scopes})
        if not scope_list:
            raise ValueError("a token needs at least one scope")
        now = time.time() if now is None else now
        claims = {"u": user, "s": stream, "e": int(now + ttl_s), "sc": scope_list}
        body = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        signing_input = f"{TOKEN_PREFIX}.{body}"
        return f"{signing_input}.{self._sign(signing_input)}"

    def verify(self, token: str | None, now: float | None = None) -> Token:
        """Check signature, shape and expiry; raises TokenError (401)."""
        if not token:
            raise TokenError(TokenFailure.MISSING, "missing bearer token")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            # Checked first: the signature below is computed over ASCII only.
            raise TokenError(TokenFailure.MALFORMED, "malformed token: too long or not ASCII text")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise TokenError(TokenFailure.MALFORMED, f"malformed token: expected '{TOKEN_PREFIX}.<claims>.<signature>'")
        expected = self._sign(f"{parts[0]}.{parts[1]}")
        if not hmac.compare_digest(expected.encode("ascii"), parts[2].encode("ascii")):
            raise TokenError(TokenFailure.BAD_SIGNATURE, "token signature does not verify")
        try:
            claims = json.loads(_b64decode(parts[1]))
            user, stream, expiry, scopes = claims["u"], claims["s"], claims["e"], claims["sc"]
            if not (isinstance(user, str) and isinstance(stream, str) and isinstance(expiry, int)):
                raise ValueError("claim types")
            token_scopes = frozenset(Scope(s) for s in scopes)
        except (ValueError, KeyError, TypeError, binascii.Error):
            # Signed but unreadable: only a buggy issuer holding the key can produce this.
            raise TokenError(TokenFailure.MALFORMED, "malformed token claims") from None
        if expiry <= (time.time() if now is None else now):
            raise TokenError(TokenFailure.EXPIRED, "token expired")
        return Token(user=user, stream=stream, expires_at=expiry, scopes=token_scopes)

    def authorize(
        self, token: str | None, scope: Scope, stream: str | None = None, now: float | None = None
    ) -> Token:
        """Verify, then require `scope` (and `stream` unless None); 401 or 403 TokenError."""
        tok = self.verify(token, now)
        if scope not in tok.scopes:
            raise TokenError(TokenFailure.WRONG_SCOPE, f"token lacks the '{scope.value}' scope")
        if stream is not None and tok.stream not in (stream, ANY_STREAM):
            raise TokenError(TokenFailure.WRONG_STREAM, "token is for another stream")
        return tok

    def authorize_header(
        self, authorization: str | None, scope: Scope, stream: str | None = None, now: float | None = None
    ) -> Token:
        """Same as `authorize`, from an HTTP ``Authorization: Bearer <token>`` header."""
        if not authorization:
            raise TokenError(TokenFailure.MISSING, "missing Authorization: Bearer header")
        kind, _, value = authorization.strip().partition(" ")
        if kind.lower() != "bearer" or not value.strip():
            raise TokenError(TokenFailure.MALFORMED, "Authorization header is not 'Bearer <token>'")
        return self.authorize(value.strip(), scope, stream, now)
