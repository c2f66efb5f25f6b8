"""The metrics table, under the name it had in this package (kept so existing imports work).

It lives in `telemetry.metrics`, below every layer that records; this name is the same module
object, not a copy, so its process-wide state (the local registry, whether Ray export failed)
is shared by every name.
"""

import sys

from telemetry import metrics as _metrics

sys.modules[__name__] = _metrics
