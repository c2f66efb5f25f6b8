"""Stream -> replica ownership for stream affinity: pure rendezvous hashing plus the
process-local view of the replica set that the `StreamAffinityRouter` keeps (router.py).

Kept apart from router.py because Serve pickles a request router's module by value: state
that must be shared with `CodecClient` in the same process lives here, imported by reference.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections.abc import Iterable, Sequence

logger = logging.getLogger(__name__)

def _score(key: str, replica_uid: str) -> int:
    # blake2b: stable across processes and Python versions (builtin hash() is salted).
    digest = hashlib.blake2b(f"{key}\x1f{replica_uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_replicas(key: str, replica_uids: Iterable[str]) -> list[str]:
    """Replica unique ids by preference for `key` (rendezvous hashing), best first."""
    return sorted(replica_uids, key=lambda uid: (_score(key, uid), uid), reverse=True)


def owner(key: str, replica_uids: Sequence[str]) -> str | None:
    if not replica_uids:
        return None
    return max(replica_uids, key=lambda uid: (_score(key, uid), uid))


# Router instances alive in this process, by (app, deployment). Several handles to the same
# deployment may each own a router; they all see the same replica set from the controller.
_LOCAL: dict[tuple[str, str], weakref.ReferenceType] = {}
_LOCAL_LOCK = threading.Lock()


class RouterView:
    """Read-only view of the live replica set as a router in this process sees it."""

    def __init__(self, router) -> None:
        self._router = weakref.ref(router)

    def replica_uids(self) -> list[str]:
        r = self._router()
        return [] if r is None else r.replica_uids()

    def owner(self, key: str) -> str | None:
        r = self._router()
        return None if r is None else r.owner_of(key)


def local_view(app_name: str, deployment_name: str) -> RouterView | None:
    with _LOCAL_LOCK:
        ref = _LOCAL.get((app_name, deployment_name))
    router = ref() if ref is not None else None
    return RouterView(router) if router is not None else None


def register(router, app_name: str, deployment_name: str) -> None:
    """Called by a router when it is created in this process."""
    with _LOCAL_LOCK:
        _LOCAL[(app_name, deployment_name)] = weakref.ref(router)
