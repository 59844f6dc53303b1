#!/usr/bin/env bash
# The GPU check in one command: install the carried wheels (if any), then run every step of
# benchmarks/gpu_check.py within its time budget. Arguments go to gpu_check.py (--out, --only, --budget_s, --smoke).
#
#   bash benchmarks/gpu_check.sh                 # writes outputs/gpu_check/gpu_check.{json,md,log}
#
# Wheels: every .whl in $GPU_CHECK_WHEELS (default: .whl/ at the repository root; see
# benchmarks/prepare_gpu_carry.sh) is installed with pip, offline, into a folder put first on PYTHONPATH, so
# the versions of requirements.txt shadow the machine's own without touching them.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"

export GPU_CHECK_WHEELS="" GPU_CHECK_WHEELS_STATUS="none carried"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    GPU_CHECK_WHEELS_STATUS="pip exit $?"
    GPU_CHECK_WHEELS="$(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
