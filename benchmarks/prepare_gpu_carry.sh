#!/usr/bin/env bash
# Fill a folder (default .whl/ at the repository root, git-ignored) with the wheels benchmarks/gpu_check.sh
# installs on a GPU machine that has no network: transformers at requirements.txt's version with the
# huggingface_hub and tokenizers it accepts, and DeepSpeed (built here, without ops) with the dependencies such a
# machine may lack. Run it where pip reaches PyPI, with this project's requirements installed; carry the folder.
#
#   bash benchmarks/prepare_gpu_carry.sh            # .whl/, for CPython 3.12 on x86-64 Linux
#   GPU_PYTHON=3.11 bash benchmarks/prepare_gpu_carry.sh /tmp/wheels
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${GPU_PYTHON:-3.12}"  # the GPU machine's Python
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"

pin() { sed -n "s/^$1==\([^ #]*\).*/\1/p" "$ROOT/requirements.txt"; }
# The version installed here: the one this project's tests ran with.
here() { "$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
download() {
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$DEST" "$@"
}

# transformers 4.57 wants huggingface_hub < 1.0 and tokenizers <= 0.23.0, older than a current image's.
download "transformers==$(pin transformers)" "huggingface_hub==$(here huggingface_hub)" \
    "tokenizers==$(here tokenizers)"
# DeepSpeed is an sdist on PyPI. Built with DS_BUILD_OPS=0 it holds no compiled op (ops are built on first use,
# and the GPU check needs none: torch's AdamW), so the wheel is pure Python and fits any Python 3.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(pin deepspeed)"
ls "$DEST"/deepspeed-*-py3-none-any.whl >/dev/null
# DeepSpeed's dependencies missing from a plain CUDA + PyTorch image.
download "hjson==$(here hjson)" "pydantic==$(here pydantic)" "pydantic_core==$(here pydantic_core)" \
    "annotated-types==$(here annotated-types)" "typing-inspection==$(here typing-inspection)"

du -sh "$DEST"
ls -1 "$DEST"
