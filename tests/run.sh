#!/usr/bin/env bash
# The test command: sets up a fresh machine (Python packages, and as root the Debian packages the
# SLURM and lint tests need), checks formatting and lint, and runs the whole suite (`--fast`: the quick subset).
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

# The formatter and linter (configured in pyproject.toml) are part of the test command.
ruff check .
ruff format --check .

# --fast: the quick subset (every module, <= 3 minutes on 2 cores); anything else goes to pytest as is.
if [ "${1:-}" = "--fast" ]; then
  shift
  exec python -m pytest -m "not slow and not slurm and not gpu" "$@"
fi
# The whole suite: most tests run one single-threaded process at a time, so two pytest workers (a test
# file each) use both cores; the `serial` tests (real timeouts and signals, SLURM) then run alone.
# Exit status 5 is "no test selected" (a -k that matches only one part).
status=0
python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not serial" --durations=15 "$@" || status=$?
[ "$status" = 0 ] || [ "$status" = 5 ] || exit "$status"
status=0
python -m pytest -m serial --durations=10 "$@" || status=$?
[ "$status" = 0 ] || [ "$status" = 5 ] || exit "$status"
