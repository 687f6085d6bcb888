#!/usr/bin/env bash
# The test command: sets up a fresh machine (Python packages, and as root the Debian packages the
# SLURM and lint tests need) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# A CPU-only box: take the CPU build of torch rather than the multi-GB CUDA one pip would pick.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]"

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v shellcheck >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
fi

exec python -m pytest "$@"
