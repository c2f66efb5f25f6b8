"""The one authorizer of every operator endpoint (control API, dashboard API).

An operator request carries ``Authorization: Bearer <token>`` with a token of the `operator`
scope signed under the cluster secret (`auralink token --scope operator --stream '*' ...`).
There is no other credential: no static API token, no built-in secret. A process that has no
usable cluster secret answers 503 to every operator request (and logs why, once); it never
falls back to anything.

Framework-free: `check` raises `AuthDenied` with the HTTP status, message and headers to
answer, and each web layer maps that to its own error type in one place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from auth.secret import SECRET_ENV, SECRET_FILE_ENV, SecretUnavailable, load_secret, secret_source
from auth.tokens import Scope, Token, TokenAuthority, TokenError

log = logging.getLogger(__name__)

BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="auralink"'}
NO_SECRET_MESSAGE = "operator API unavailable: no cluster secret is configured on this server"


class AuthDenied(Exception):
    """A refused operator request: 401 (no or bad token), 403 (no operator scope), 503 (no
    cluster secret on this server)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def headers(self) -> dict[str, str] | None:
        return dict(BEARER_CHALLENGE) if self.status == 401 else None


class OperatorAuthorizer:
    """Checks operator tokens under the cluster secret of this process's environment.

    The secret is read on first use and again whenever ``AURALINK_SECRET`` or
    ``AURALINK_SECRET_FILE`` changes, so a secret provisioned after start-up is picked up.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self._key: tuple[str | None, str | None] | None = None
        self._authority: TokenAuthority | None = None
        self._reported: tuple[str | None, str | None] | None = None

    def _env(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def authority(self) -> TokenAuthority:
        """The token verifier, or `AuthDenied` (503) when no usable secret is configured."""
        env = self._env()
        key = (env.get(SECRET_ENV), env.get(SECRET_FILE_ENV))
        if self._authority is not None and key == self._key:
            return self._authority
        try:
            authority = TokenAuthority(load_secret(env))
        except SecretUnavailable as exc:
            if self._reported != key:  # once per configuration, not once per request
                log.error("operator endpoints answer 503: %s", exc)
                self._reported = key
            raise AuthDenied(503, NO_SECRET_MESSAGE) from None
        self._key, self._authority = key, authority
        log.info("operator tokens are checked under the cluster secret from %s", secret_source(env))
        return authority

    def check(self, authorization: str | None) -> Token:
        """The operator token of an ``Authorization`` header, or `AuthDenied`."""
        authority = self.authority()
        try:
            return authority.authorize_header(authorization, Scope.OPERATOR)
        except TokenError as exc:
            raise AuthDenied(exc.status, str(exc)) from None


OPERATOR_AUTHORIZER = OperatorAuthorizer()
