"""Telemetry shared by every layer: the AuraLink metrics table and its recording helpers.

It sits at the bottom with `models` and `auth` (it imports no other AuraLink package), so the
codec replicas and the supervisor (`deployments`), the bridge and the hint limiter
(`sfu_bridge`), the autoscaling policy and the CLI all record through it without any import
running upward.
"""
