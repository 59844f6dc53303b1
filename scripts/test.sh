#!/usr/bin/env bash
# Run the test suite, setting up .venv first where it is missing (see scripts/setup_env.sh), with the
# lm-evaluation-harness extra that the lm-eval task tests need (EXTRAS= leaves it out).
#
#   bash scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS-lmeval}
source scripts/setup_env.sh
exec python -m pytest -q tests "$@"
