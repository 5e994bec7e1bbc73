#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs magistune with its test, plotting and RL (math-verify) extras.
# As root on Debian it also installs Chromium (apt-get), which the `magistune inspect` report's browser test drives.
# On a CPU machine torch is pinned to 2.13.0 (a CPU build); an existing torch in the venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/python -m pip install -q -e ".[extras,test,rl]" 2>&1 | grep -v '^WARNING: Location' || true
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends chromium >/dev/null 2>&1; } \
    || echo "note: could not install chromium; tests/inspection's browser test will install it or skip"
fi
.venv/bin/python -c "import magistune, torch, transformers, peft, mistral_common; print('magistune', magistune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| mistral-common', mistral_common.__version__)"
