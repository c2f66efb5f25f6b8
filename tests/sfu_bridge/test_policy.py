"""Operator policy: a per-user bitrate cap and DTX switch, kept with the opt-outs, reach the
bridge through its supervisor link and bound what the user's streams are encoded at."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config import SupervisorSettings
from deployments.supervisor import FallbackSupervisorCore
from deployments.supervisor_policy import SupervisorConfig
from deployments.user_policy import UserPolicies, UserPolicy
from sfu_bridge.core import BridgeCore, SupervisorLink


def _core(kv):
    return FallbackSupervisorCore(SupervisorSettings(), SupervisorConfig(), kv.__setitem__, kv.get)


def test_policies_are_written_through_and_survive_a_restart():
    kv: dict[bytes, bytes] = {}
    core = _core(kv)
    core.opt_out(user_id="mallory")
    core.set_user_policy("alice", 3.0, True)
    core.set_user_policy("bob", None, False)
    again = _core(kv)  # the actor restarted: state comes back from the store
    assert again.user_policies.get("alice") == UserPolicy(3.0, True)
    assert again.user_policies.get("bob") == UserPolicy(None, False)
    assert again.user_policies.for_users(["alice", "carol"]) == {"alice": {"max_kbps": 3.0, "dtx": True}}
    assert "mallory" in again.policy.snapshot()["opted_out_users"]  # the same record
    again.set_user_policy("alice", None, True)  # back to the default: forgotten
    assert len(_core(kv).user_policies) == 1


@pytest.mark.parametrize("bad", [0.5, 48.0])
def test_a_cap_outside_the_layers_is_refused(bad):
    with pytest.raises(ValueError, match="outside"):
        UserPolicies().set("u", UserPolicy(max_kbps=bad))


def test_the_bridge_applies_caps_and_dtx_switches_from_the_supervisor(replica_core, sine_chunk):
    kv: dict[bytes, bytes] = {}
    sup = _core(kv)
    sup.set_user_policy("capped", 1.5, True)
    sup.set_user_policy("talky", None, False)

    async def report(reports):
        return sup.report(reports)

    async def policies(users):
        return sup.user_policies.for_users(users)

    core = BridgeCore(replica_core(max_bandwidth_kbps=24.0), deadline_ms=60_000.0, bandwidth_kbps=24.0,
                      dtx=True, supervisor=SupervisorLink(report, period_s=0.0, policies=policies))
    for sid, user in (("s1", "capped"), ("s2", "talky"), ("s3", "free")):
        core.join(sid, user=user)

    async def go():
        out = []
        for i in range(3):
            for sid in ("s1", "s2", "s3"):
                core.push(sid, sine_chunk(200, i) if sid != "s2" else np.zeros(960, np.float32))
            r = await core.tick()
            await core.close()  # the exchange (reports and policies) has come back
            out.append({f.stream_id: (f.key, f.n_q) for f in r.frames()})
        return out

    first, _, last = asyncio.run(go())
    assert first["s1"] == ("ai", 32)  # before the first exchange: no policy yet
    assert last["s1"] == ("ai", 2)  # capped at 1.5 kbps though the stream asks for 24
    assert last["s3"] == ("ai", 32)
    assert last["s2"][0] == "ai"  # silent, but its user's DTX is off: still AI
    assert core.stream("s2").dtx_enabled is False
    assert core.stream("s1").cap_kbps == 1.5 and core.stream("s3").cap_kbps is None
