"""Bridge fleet logic without Ray: ownership, placement, liveness, drains."""

from __future__ import annotations

from deployments.affinity import owner as rendezvous_owner
from sfu_bridge.fleet import (
    Route,
    RouteKind,
    RouteReason,
    SignalKind,
    WorkerReport,
    WorkerTable,
    choose_drain,
)

PUB, SUB = SignalKind.PUBLISH, SignalKind.SUBSCRIBE


def rep(wid: str, streams: dict[str, float] | None = None, seq: int = 1, sessions: int | None = None,
        started_at: float = 0.0) -> WorkerReport:
    streams = streams or {}
    return WorkerReport(
        worker_id=wid, actor_name=f"auralink-bridge-{wid}", url=f"http://pub-{wid}:8100",
        internal_url=f"http://10.0.0.{len(wid)}:8100", node_ip="10.0.0.1", pid=1,
        streams=streams, sessions=len(streams) if sessions is None else sessions, seq=seq,
        started_at=started_at,
    )


def table(*reports: WorkerReport, now: float = 0.0) -> WorkerTable:
    t = WorkerTable(dead_after_s=3.0)
    for r in reports:
        t.report(r, now)
    return t


def test_the_owner_is_the_worker_holding_the_publisher_and_gets_both_kinds():
    t = table(rep("a"), rep("b", {"room": 1.0}), rep("c"))
    for kind in (PUB, SUB):
        r = t.route("room", kind, asking="a", now=1.0)
        assert (r.kind, r.reason, r.worker_id, r.url) == (
            RouteKind.REDIRECT, RouteReason.OWNER, "b", "http://pub-b:8100")
        assert r.internal_url == "http://10.0.0.1:8100"
    assert t.route("room", SUB, asking="b", now=1.0).kind is RouteKind.LOCAL


def test_a_new_stream_is_placed_by_rendezvous_hash_and_every_worker_names_the_same():
    t = table(rep("a"), rep("b"), rep("c"))
    streams = [f"s{i}" for i in range(60)]
    for s in streams:
        routes = {t.route(s, PUB, asking=w, now=1.0) for w in "abc"}
        winners = {r.worker_id for r in routes}
        assert winners == {rendezvous_owner(s, ["a", "b", "c"])}
        assert all(r.reason is RouteReason.PLACED for r in routes)
    assert len({rendezvous_owner(s, ["a", "b", "c"]) for s in streams}) == 3  # spread over all


def test_a_subscriber_of_a_stream_nobody_publishes_is_refused():
    r = table(rep("a")).route("ghost", SUB, asking="a", now=1.0)
    assert (r.kind, r.reason) == (RouteKind.REFUSE, RouteReason.NO_PUBLISHER)


def test_draining_workers_take_no_new_stream_but_keep_their_own():
    t = table(rep("a", {"old": 1.0}), rep("b"))
    t.set_draining("a", True, now=1.0)
    for s in (f"new{i}" for i in range(20)):
        assert t.route(s, PUB, asking="a", now=1.0).worker_id == "b"
    assert t.route("old", SUB, asking="b", now=1.0).worker_id == "a"
    assert t.route("old", PUB, asking="a", now=1.0).kind is RouteKind.LOCAL  # republish stays
    t.set_draining("b", True, now=1.0)
    r = t.route("new0", PUB, asking="a", now=1.0, retry_after_s=5)
    assert (r.kind, r.reason, r.retry_after_s) == (RouteKind.REFUSE, RouteReason.NO_WORKER, 5)


def test_a_silent_worker_owns_nothing_so_its_publisher_lands_on_a_survivor():
    t = table(rep("a", {"room": 1.0}), rep("b"), now=0.0)
    t.report(rep("b", seq=2), now=3.5)  # b keeps reporting, a went silent at 0.0
    assert t.route("room", SUB, asking="b", now=2.9).worker_id == "a"
    r = t.route("room", PUB, asking="b", now=3.5)
    assert (r.kind, r.reason) == (RouteKind.LOCAL, RouteReason.PLACED)
    assert [w.worker_id for w in t.stale(3.5)] == ["a"]


def test_two_workers_reporting_a_stream_the_newest_publisher_wins():
    t = table(rep("a", {"room": 5.0}), rep("b", {"room": 9.0}))
    assert t.route("room", SUB, asking="a", now=1.0).worker_id == "b"


def test_an_older_report_never_overwrites_a_newer_one():
    t = table(rep("a", {"room": 1.0}, seq=5))
    t.report(rep("a", {}, seq=4), now=1.0)
    assert t.owner_of("room", now=1.0) is not None
    t.report(rep("a", {}, seq=6), now=1.0)
    assert t.owner_of("room", now=1.0) is None


def test_route_round_trips_as_plain_data():
    r = Route(RouteKind.REDIRECT, RouteReason.OWNER, "b", "http://x:1", "http://y:1", 0)
    assert Route.from_dict(r.to_dict()) == r
    w = rep("a", {"s": 2.0})
    assert WorkerReport.from_dict({**w.to_dict(), "unknown_future_field": 1}) == w


def test_drain_choice_prefers_idle_then_young_workers():
    recs = table(rep("a", sessions=3, started_at=1.0), rep("b", sessions=0, started_at=1.0),
                 rep("c", sessions=0, started_at=5.0)).records.values()
    assert choose_drain(recs, 2) == ["c", "b"]
    assert choose_drain(recs, 0) == []


# -- cascading ---------------------------------------------------------------------------------
def relay_rep(wid: str, streams: dict[str, float] | None = None, sessions: int = 0, seq: int = 1,
              relayed: dict[str, int] | None = None, relay: bool = True) -> WorkerReport:
    r = rep(wid, streams, seq=seq, sessions=sessions)
    return WorkerReport(**{**r.to_dict(), "relay_addr": ["10.0.0.9", 7000 + ord(wid[0])] if relay else None,
                           "relayed": relayed or {}})


def cascading(*reports: WorkerReport, after: int = 3) -> WorkerTable:
    t = WorkerTable(dead_after_s=3.0, cascade_after=after)
    for r in reports:
        t.report(r, 0.0)
    return t


def test_subscribers_meet_the_publisher_until_the_owner_holds_cascade_after_sessions():
    t = cascading(relay_rep("a", {"room": 1.0}, sessions=1), relay_rep("b"), relay_rep("c"), after=3)
    # sessions 1 -> 2 -> 3 (the two subscribers routed to the owner count before its next report)
    assert [t.route("room", SUB, asking="b", now=1.0).reason for _ in range(2)] == [RouteReason.OWNER] * 2
    r = t.route("room", SUB, asking="b", now=1.0)
    assert (r.kind, r.reason, r.worker_id) == (RouteKind.LOCAL, RouteReason.CASCADE, "b")
    assert r.relay_addr == ("10.0.0.9", 7097)  # the owner's relay, which b follows the stream from
    assert Route.from_dict(r.to_dict()) == r
    # a publisher is never cascaded
    assert t.route("room", PUB, asking="b", now=1.0).reason is RouteReason.OWNER


def test_a_full_asking_worker_sends_subscribers_to_a_follower_with_room_then_the_least_loaded():
    t = cascading(relay_rep("a", {"room": 1.0}, sessions=9), relay_rep("b", sessions=5),
                  relay_rep("c", sessions=2, relayed={"room": 2}), relay_rep("d", sessions=0), after=3)
    r = t.route("room", SUB, asking="b", now=1.0)  # b is full; c follows the stream and has room
    assert (r.kind, r.reason, r.worker_id) == (RouteKind.REDIRECT, RouteReason.CASCADE, "c")
    # c serves it without asking again: counted at once, so c is now full too
    r = t.route("room", SUB, asking="b", now=1.0)
    assert (r.kind, r.worker_id) == (RouteKind.REDIRECT, "d")  # the least loaded
    # d asks again when the redirected request arrives: it keeps it
    r = t.route("room", SUB, asking="d", now=1.0)
    assert (r.kind, r.reason, r.worker_id) == (RouteKind.LOCAL, RouteReason.CASCADE, "d")


def test_no_cascade_without_relays_without_other_admitting_workers_or_when_disabled():
    owner = relay_rep("a", {"room": 1.0}, sessions=50)
    assert cascading(owner, relay_rep("b", relay=False)).route("room", SUB, "b", 1.0).reason is RouteReason.OWNER
    assert cascading(owner).route("room", SUB, "a", 1.0).reason is RouteReason.OWNER
    assert cascading(owner, relay_rep("b"), after=0).route("room", SUB, "b", 1.0).reason is RouteReason.OWNER
    t = cascading(owner, relay_rep("b"))
    t.set_draining("b", True, 0.0)
    assert t.route("room", SUB, "b", 1.0).reason is RouteReason.OWNER
    # every other worker more loaded than the owner: the owner keeps it
    t = cascading(relay_rep("a", {"room": 1.0}, sessions=4), relay_rep("b", sessions=6))
    assert t.route("room", SUB, "b", 1.0).reason is RouteReason.OWNER


def test_a_burst_between_reports_spreads_and_a_new_report_resets_the_estimate():
    t = cascading(relay_rep("a", {"room": 1.0}, sessions=3), relay_rep("b"), relay_rep("c"), after=3)
    served = [t.route("room", SUB, asking=w, now=1.0).worker_id for w in ("b", "b", "b", "b", "c")]
    assert served == ["b", "b", "b", "c", "c"]  # b takes 3 (its room), then the asking c
    t.report(relay_rep("b", sessions=0, seq=2), 1.0)
    assert t.route("room", SUB, asking="b", now=1.0).worker_id == "b"


def test_a_follower_learns_where_a_moved_publisher_is_relayed_from():
    t = cascading(relay_rep("a", {"room": 1.0}), relay_rep("b", relayed={"room": 3, "gone": 1}))
    assert t.relay_owners(["room", "gone"], "b", 1.0) == {"room": ["10.0.0.9", 7097]}
    # the publisher republished on c (newer): b follows it there
    t.report(relay_rep("c", {"room": 2.0}), 1.0)
    assert t.relay_owners(["room"], "b", 1.0) == {"room": ["10.0.0.9", 7099]}
    # a stream b publishes itself is never relayed to it
    assert t.relay_owners(["room"], "c", 1.0) == {}


def test_a_stream_at_its_per_stream_cap_cascades_before_the_threshold_and_never_to_a_capped_worker():
    """A worker refuses a stream's subscribers past its per-stream cap (503): a call bigger
    than that cap spreads even while its owner holds fewer sessions than `cascade_after`."""
    full = WorkerReport(**{**relay_rep("a", {"room": 1.0}, sessions=201).to_dict(), "full": ["room"]})
    capped_b = WorkerReport(**{**relay_rep("b", sessions=200, relayed={"room": 200}).to_dict(), "full": ["room"]})
    t = cascading(full, capped_b, relay_rep("c", sessions=300), after=400)
    r = t.route("room", SUB, asking="a", now=1.0)
    assert (r.kind, r.reason, r.worker_id) == (RouteKind.REDIRECT, RouteReason.CASCADE, "c")
    # b follows the stream but holds its cap: c, though busier than the owner, is asked
    assert t.route("room", SUB, asking="b", now=1.0).worker_id == "c"
    # without the cap reached, the owner below the threshold keeps its subscribers
    t = cascading(relay_rep("a", {"room": 1.0}, sessions=201), relay_rep("c"), after=400)
    assert t.route("room", SUB, asking="a", now=1.0).reason is RouteReason.OWNER
