"""FastAPI side of the operator authorizer: the control API and the dashboard API both call
`require_operator`, so every operator endpoint accepts and refuses exactly the same requests.

The check itself is `auth.operator.OPERATOR_AUTHORIZER` (an `operator`-scope token signed
under the cluster secret; 503 when this process has no secret). The replica gets the secret
from its environment - ``AURALINK_SECRET_FILE`` (a path, set by `auralink up` in the
application's runtime_env) or ``AURALINK_SECRET`` - never from application arguments or
``user_config``, which Serve writes to its logs.
"""

from fastapi import HTTPException

from auth.operator import OPERATOR_AUTHORIZER, AuthDenied
from auth.tokens import Token


def require_operator(authorization: str | None) -> Token:
    """The request's operator token, or an `HTTPException` (401, 403 or 503)."""
    try:
        return OPERATOR_AUTHORIZER.check(authorization)
    except AuthDenied as exc:
        raise HTTPException(exc.status, exc.message, headers=exc.headers) from None
