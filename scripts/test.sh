#!/usr/bin/env bash
# Run the test suite, setting up .venv first where it is missing (see scripts/setup_env.sh).
#
#   bash scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m pytest -q tests "$@"
