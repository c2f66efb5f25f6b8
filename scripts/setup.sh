#!/usr/bin/env bash
# Installs AuraLink AIC into ./.venv (editable, with the dev tools).
#   bash scripts/setup.sh          Python packages and Debian's espeak-ng (the adaptive bench's speech)
#   bash scripts/setup.sh --test   also Debian's chromium (browser tests) and GStreamer (interop test)
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter: $PYTHON if set, else Debian's CPython 3.11 (/usr/bin/python3.11; its
# packages are installed if missing), else python3. Debian builds its interpreter with
# profile-guided and link-time optimisation and a static libpython; on a CPython built without
# them (pyenv's default build, which is python3 on this kind of machine) a pure-Python loop
# runs 35-45% slower and the replica's bookkeeping costs about 10% more CPU
# (docs/benchmarks.md, "Runs 32 to 39").
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  PY=/usr/bin/python3.11
  if ! { [ -x "$PY" ] && "$PY" -c 'import ensurepip, venv, sysconfig, os; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' 2>/dev/null; }; then
    echo "[setup] installing Debian's python3.11 with venv and headers"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
           python3.11 python3.11-venv python3.11-dev >/dev/null; }; then
      echo "[setup] no Debian python3.11: using python3 (a build without PGO/LTO is slower)"
      PY=python3
    fi
  fi
fi
# The interpreter itself says which it is (past shims and links). A .venv made from another
# interpreter is made again (it holds nothing but installs).
want=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')
if [ -f .venv/pyvenv.cfg ]; then
  made_with=$(sed -n 's/^executable = //p' .venv/pyvenv.cfg)
  if [ -n "$made_with" ] && [ "$(readlink -f "$made_with")" != "$want" ]; then
    echo "[setup] .venv was made with $made_with; making it again with $want"
    rm -rf .venv
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PY" --version) ($want)"
  "$PY" -m venv .venv
fi
stamp=.venv/.auralink-installed
stale=0
[ -f "$stamp" ] || stale=1
# the project's files that change what is installed: its metadata and its C parts (setup.py)
for f in pyproject.toml setup.py sfu_bridge/_rtpsend.c sfu_bridge/_tick.c deployments/_columns.c deployments/_buffers.h; do
  [ "$f" -nt "$stamp" ] && stale=1
done
if [ "$stale" = 1 ]; then
  echo "[setup] installing pinned dependencies (torch 2.11.0 CUDA build: a few GB, about a minute)"
  echo "[setup] and building the C parts (needs gcc): the bridge's packet path, send and receive"
  echo "[setup] (sfu_bridge/_rtpsend.c), its chunk queue (sfu_bridge/_tick.c) and the replica's queue loops (deployments/_columns.c)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
else
  echo "[setup] .venv is up to date"
fi

# espeak-ng: `auralink bench adaptive` synthesises its conversational speech with it
if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "[setup] installing Debian's espeak-ng (speech for the adaptive bench)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi

if [ "${1:-}" = "--test" ]; then
  # chromium: browser tests; GStreamer webrtcbin + PyGObject (system python3): interop test
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  for pkg in gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
             gstreamer1.0-plugins-bad gstreamer1.0-nice python3-gi gir1.2-gstreamer-1.0 \
             gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "[setup] installing Debian packages for the browser and interop tests: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      "${missing[@]}" >/dev/null
  fi
fi
echo "[setup] done"
