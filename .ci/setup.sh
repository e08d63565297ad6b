#!/usr/bin/env bash
# Set up LoRA Studio on a fresh machine: torch (if missing), the package and its extras.
#   bash .ci/setup.sh        # the app
#   bash .ci/setup.sh test   # the app + test tools + Chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PY=${PYTHON:-python3}
# torch first and pinned: an unpinned torch pulls the newest CUDA build (several GB). With a GPU, install the
# CUDA build of your choice before running this; an installed torch is kept.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
if [ "${1:-}" = "test" ]; then
  "$PY" -m pip install -q -e ".[test,captioners,logging]"
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will be skipped" >&2
  fi
else
  "$PY" -m pip install -q -e ".[optim,captioners]"
fi
