"""AuraLink metrics, under the name the CLI, the simulator and operators know.

The table of metrics and its recording helpers live in `telemetry.metrics`, the lowest layer
that every recording process (codec replicas, the supervisor, bridges, the limiter, the
autoscaling policy) imports without reaching up into `cluster`. This name is the same module
object, not a copy, so its process-wide state (the local registry, whether Ray export failed)
is shared by both names.
"""

import sys

from telemetry import metrics as _metrics

sys.modules[__name__] = _metrics
