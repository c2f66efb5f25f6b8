"""The operator authorizer: operator tokens under the cluster secret, 401/403/503, never 500."""

from __future__ import annotations

import pytest

from auth.operator import NO_SECRET_MESSAGE, AuthDenied, OperatorAuthorizer
from auth.secret import SECRET_ENV
from auth.tokens import TokenAuthority

SECRET = "operator-test-secret-0123456789"
FORMER_DEV_SECRET = b"auralink-dev-secret-do-not-use-in-production"


def _denied(authorizer: OperatorAuthorizer, header: str | None) -> AuthDenied:
    with pytest.raises(AuthDenied) as err:
        authorizer.check(header)
    return err.value


def test_operator_token_passes_others_get_401_or_403():
    authz = OperatorAuthorizer({SECRET_ENV: SECRET})
    issuer = TokenAuthority(SECRET.encode())
    assert authz.check(f"Bearer {issuer.issue('ops', '*', ['operator'])}").user == "ops"
    err = _denied(authz, f"Bearer {issuer.issue('alice', 'room1', ['publish'])}")
    assert (err.status, err.message, err.headers) == (403, "token lacks the 'operator' scope", None)
    err = _denied(authz, None)
    assert err.status == 401 and err.headers == {"WWW-Authenticate": 'Bearer realm="auralink"'}
    foreign = TokenAuthority(b"another-secret-0123456789").issue("ops", "*", ["operator"])
    assert _denied(authz, f"Bearer {foreign}").status == 401


@pytest.mark.parametrize("header", [
    "Bearer al1.\u00e9t\u00e9.sig",            # non-ASCII claims
    "Bearer al1.e30.\u00e9",                   # non-ASCII signature
    "Bearer \udcc3\udca9",                      # undecodable bytes as an HTTP server passes them
    "Bearer \u043c\u043e\u0439-\u0442\u043e\u043a\u0435\u043d",
])
def test_non_ascii_tokens_are_401_not_a_crash(header):
    err = _denied(OperatorAuthorizer({SECRET_ENV: SECRET}), header)
    assert (err.status, err.message) == (401, "malformed token: too long or not ASCII text")


def test_no_secret_refuses_everything_with_503():
    authz = OperatorAuthorizer({})
    forged = TokenAuthority(FORMER_DEV_SECRET).issue("mallory", "*", ["operator"])
    for header in (None, f"Bearer {forged}"):
        err = _denied(authz, header)
        assert (err.status, err.message) == (503, NO_SECRET_MESSAGE)


def test_a_secret_configured_later_is_picked_up():
    env: dict[str, str] = {}
    authz = OperatorAuthorizer(env)
    token = TokenAuthority(SECRET.encode()).issue("ops", "*", ["operator"])
    assert _denied(authz, f"Bearer {token}").status == 503
    env[SECRET_ENV] = SECRET
    assert authz.check(f"Bearer {token}").user == "ops"
    env[SECRET_ENV] = "rotated-secret-0123456789"
    assert _denied(authz, f"Bearer {token}").status == 401
