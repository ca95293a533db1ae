#!/usr/bin/env bash
# Prepare a fresh machine: system libraries for napari's Qt canvas under Xvfb, a
# virtual environment in .venv, and the package with its test extras.  Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=0
for cmd in xvfb-run xauth; do command -v "$cmd" >/dev/null 2>&1 || need_apt=1; done
[ -e /usr/lib/x86_64-linux-gnu/libxkbcommon-x11.so.0 ] || [ -e /usr/lib/aarch64-linux-gnu/libxkbcommon-x11.so.0 ] || need_apt=1
if [ "$need_apt" = 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends xvfb xauth libxcb-icccm4 libxcb-keysyms1 \
      libxcb-xinerama0 libxcb-image0 libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 \
      libxcb-xkb1 libxkbcommon-x11-0 libdbus-1-3 libgl1 libegl1 libfontconfig1 libglib2.0-0 >/dev/null
  else
    echo "warning: Xvfb/Qt libraries missing and cannot apt-get install them (not root); GUI tests will be skipped" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# constraints.txt pins the CPU build of torch; the package itself asks for a range
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[testing]"
touch "$VENV/.installed"
