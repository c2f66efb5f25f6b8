"""The compiled parts, both optional (without a C compiler the install still succeeds):

- sfu_bridge._rtpsend: the bridge's per-packet RTP send and receive (fastpath.py,
  aiortc_compat.py), the packing of AIC payloads' codes (aic_payload.py) and the hint tags'
  and replay windows' check (hint_auth.py `HintTable`). Without it the bridge sends and
  receives through its Python path (it logs so at start) and checks hints through one
  `HintVerifier` per stream.
- sfu_bridge._tick: the bridge core's per-tick loops over its chunk queue and a tick's hints
  (core.py). Without it their numpy versions run (the same results).
- deployments._columns: loops of the codec replica's per-step bookkeeping over its stream
  columns (arrivals.py, scheduler.py, replica.py) and a request's value checks
  (contract.py). Without it their numpy versions run (the same results).

Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("sfu_bridge._rtpsend", ["sfu_bridge/_rtpsend.c"], optional=True,
              extra_compile_args=["-O2"]),
    Extension("sfu_bridge._tick", ["sfu_bridge/_tick.c"], optional=True, extra_compile_args=["-O2"],
              include_dirs=["deployments"], depends=["deployments/_buffers.h"]),
    # no floating-point contraction: a * b + c rounds twice, as numpy's two operations do
    Extension("deployments._columns", ["deployments/_columns.c"], optional=True,
              extra_compile_args=["-O2", "-ffp-contract=off"], libraries=["m"],
              depends=["deployments/_buffers.h"]),
])
