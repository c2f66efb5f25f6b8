"""The one compiled part: sfu_bridge._rtpsend (the bridge's per-packet RTP send and receive:
fastpath.py, aiortc_compat.py; the packing of AIC payloads' codes, aic_payload.py; and the
hint tags' and replay windows' check, hint_auth.py `HintTable`).

Everything else is in pyproject.toml. The extension is optional: without a C compiler the
install still succeeds and the bridge sends and receives through its Python path (it logs so
at start) and checks hints through one `HintVerifier` per stream.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("sfu_bridge._rtpsend", ["sfu_bridge/_rtpsend.c"], optional=True,
              extra_compile_args=["-O2"]),
])
