"""Bearer tokens for WHIP/WHEP, and the `auralink token` command.

The token format and checks live in `auth.tokens`, the cluster secret in `auth.secret` (both
shared with the Serve application); this module re-exports them for the bridge.

CLI: ``auralink token --user U --stream S --scope publish --ttl 3600`` prints a token signed
under the cluster secret: ``$AURALINK_SECRET``, else ``$AURALINK_SECRET_FILE``, else the
``runs/cluster-secret`` that `auralink up` / `simulate` / `bridge` created in this folder
(``$AURALINK_RUN_DIR`` moves it). With none of them it says what to set and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from auth.secret import (
    MIN_SECRET_BYTES,
    SECRET_ENV,
    SECRET_FILE_ENV,
    SecretUnavailable,
    default_secret_file,
    load_secret,
)
from auth.tokens import (
    ANY_STREAM,
    MAX_TOKEN_CHARS,
    TOKEN_PREFIX,
    Scope,
    Token,
    TokenAuthority,
    TokenError,
    TokenFailure,
)

__all__ = [
    "ANY_STREAM", "MAX_TOKEN_CHARS", "MIN_SECRET_BYTES", "SECRET_ENV", "SECRET_FILE_ENV",
    "TOKEN_PREFIX", "Scope", "SecretUnavailable", "Token", "TokenAuthority", "TokenError",
    "TokenFailure", "load_secret",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="user id the token is issued to")
    parser.add_argument("--stream", required=True, help=f"stream id, or '{ANY_STREAM}' for any stream")
    parser.add_argument(
        "--scope", action="append", choices=[s.value for s in Scope], required=True,
        help="scope (repeat for several)",
    )
    parser.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry (default 3600)")
    parser.add_argument(
        "--hint-key", action="store_true",
        help="also print the stream's hex hint-signing key (for an SDK publisher) on a second line",
    )


def run(args: argparse.Namespace) -> int:
    try:
        secret = load_secret(fallback_file=default_secret_file())
    except SecretUnavailable as exc:
        print(
            f"auralink token: {exc}.\n"
            f"Set {SECRET_FILE_ENV} to the cluster's secret file (or {SECRET_ENV} to the secret), "
            f"or run this where `auralink up` (or `simulate`, `bridge`) created runs/cluster-secret.",
            file=sys.stderr,
        )
        return 2
    try:
        token = TokenAuthority(secret).issue(args.user, args.stream, args.scope, args.ttl)
    except ValueError as exc:
        print(f"auralink token: {exc}", file=sys.stderr)
        return 2
    print(token)
    if args.hint_key:
        if args.stream == ANY_STREAM:
            print("auralink token: --hint-key needs a concrete --stream", file=sys.stderr)
            return 2
        from sfu_bridge.hint_auth import derive_stream_key

        print(derive_stream_key(secret, args.stream).hex())
    return 0
