"""The wire contract's result summary: BatchResult.counts."""

from __future__ import annotations

import numpy as np

from deployments.contract import DTX_CODE, BatchResult, FallbackReason, reason_code


def _result(codes: list[int]) -> BatchResult:
    b = len(codes)
    return BatchResult(stream_ids=[f"s{i}" for i in range(b)], outcome_codes=np.array(codes, np.uint8),
                       epochs=np.zeros(b, np.int64), queue_ms=np.zeros(b, np.float32),
                       compute_ms=np.zeros(b, np.float32))


def test_counts_name_every_outcome_once_and_only_those_present():
    """Frames by outcome key: an all-`ai` result, an empty one, and every kind mixed."""
    deadline, reset = reason_code(FallbackReason.DEADLINE), reason_code(FallbackReason.RESET)
    assert _result([0] * 7).counts() == {"ai": 7}
    assert _result([]).counts() == {}
    assert _result([deadline, 0, DTX_CODE, 0, reset, deadline]).counts() == {
        "ai": 2, "dtx": 1, "fallback/deadline": 2, "fallback/reset": 1}
    assert _result([reset] * 3).counts() == {"fallback/reset": 3}
