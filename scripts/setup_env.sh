# Sourced by scripts/train.sh and scripts/test.sh: make sure .venv holds torch 2.13.0 and the pinned
# requirements (plus this repository, editable), creating or updating it only when needed, then put it first
# on PATH. Everything goes through pip's configured index and settings (PIP_INDEX_URL, pip.conf, ...).
#
#   USE_CURRENT_ENV=1   use the active Python environment as it is (you installed the requirements yourself)
#   VENV=path           where the environment lives (default .venv in the repository)
#   EXTRAS=lmeval       optional extras of pyproject.toml to install too (comma-separated)
#   TORCH_CPU_INDEX_URL index that serves CPU builds of torch, used where no GPU is found (PyPI's Linux
#                       torch is the CUDA build; a CPU-only machine saves several GB with it)
if [ "${USE_CURRENT_ENV:-0}" = 1 ]; then
  return 0 2>/dev/null || exit 0
fi
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$_repo/.venv}
_want="torch==2.13.0 extras=${EXTRAS:-} $(cat "$_repo/requirements.txt" "$_repo/pyproject.toml" | cksum)"
# One line per set-up done (requirements x extras), so train.sh and test.sh do not undo each other's.
if [ ! -x "$VENV/bin/python" ] || ! grep -qxF "$_want" "$VENV/.baichuan-setup" 2>/dev/null; then
  echo "setup: preparing $VENV (torch 2.13.0 and requirements.txt; once, a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  _torch_args=()
  if ! (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU') \
      && [ -n "${TORCH_CPU_INDEX_URL:-}" ]; then
    _torch_args=(--index-url "$TORCH_CPU_INDEX_URL")
  fi
  "$VENV/bin/python" -m pip install -q "${_torch_args[@]}" torch==2.13.0
  _target="$_repo"
  [ -n "${EXTRAS:-}" ] && _target="$_repo[$EXTRAS]"
  "$VENV/bin/python" -m pip install -q -e "$_target"
  echo "$_want" >> "$VENV/.baichuan-setup"
  echo "setup: $VENV ready" >&2
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
