#!/usr/bin/env bash
# Launch train.py with DeepSpeed.
#
#   scripts/train.sh [extra train.py flags...]
#
# With a real config/hostfile (one "<address> slots=8" line per node) this trains the 7b preset on every node:
#   deepspeed --hostfile config/hostfile --force_multi train.py --deepspeed --deepspeed_config config/deepspeed.json ...
# While config/hostfile is still the template, it trains the tiny preset on this machine alone, on all local GPUs
# or, without one, on 2 CPU ranks, over the shipped data_dir/: a fresh clone's end-to-end run in a few minutes.
#
# Environment overrides: HOSTFILE, DS_CONFIG, MODEL (preset or config.json), GPUS_PER_NODE, DATA_DIR,
# TOKENIZER, SAVE_DIR, MAX_LENGTH, MAX_STEPS, MASTER_PORT. Extra arguments go to train.py unchanged.
# The first run sets up .venv (scripts/setup_env.sh); USE_CURRENT_ENV=1 uses the active environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

HOSTFILE=${HOSTFILE:-config/hostfile}
DATA_DIR=${DATA_DIR:-data_dir}
TOKENIZER=${TOKENIZER:-tokenizer.model}
MASTER_PORT=${MASTER_PORT:-29500}

is_template() {
  [ ! -f "$1" ] && return 0
  # Template = no host line other than the YOUR_NODE_ placeholders.
  ! grep -Ev '^[[:space:]]*(#|$)' "$1" | grep -Ev '^[[:space:]]*YOUR_NODE_' | grep -q .
}

if is_template "$HOSTFILE"; then
  GPUS=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU') || echo 0)
  if [ "${GPUS_PER_NODE:-$GPUS}" -gt 0 ]; then
    LAUNCH=(--num_gpus "${GPUS_PER_NODE:-$GPUS}")
    where="${GPUS_PER_NODE:-$GPUS} local GPU(s)"
  else
    LAUNCH=(--num_gpus "${GPUS_PER_NODE:-2}")  # DeepSpeed's CPU accelerator: one process per "GPU", gloo backend
    where="${GPUS_PER_NODE:-2} CPU ranks (no GPU found)"
    export DS_ACCELERATOR=cpu  # said once here rather than warned by every process that imports DeepSpeed
    ext_dir=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
    if ! ls "$ext_dir"/*/fused_adam/*.so "$ext_dir"/*/deepspeed_shm_comm/*.so >/dev/null 2>&1; then
      echo "train.sh: first run here: DeepSpeed compiles its CPU ops (shared-memory all-reduce, Adam) once," \
        "about 2 minutes, into $ext_dir (set TORCH_EXTENSIONS_DIR to move it)" >&2
    fi
  fi
  DS_CONFIG=${DS_CONFIG:-config/deepspeed_tiny.json}
  MODEL=${MODEL:-tiny}
  MAX_LENGTH=${MAX_LENGTH:-256}
  MAX_STEPS=${MAX_STEPS:-100}
  SAVE_DIR=${SAVE_DIR:-checkpoints/tiny}
  echo "train.sh: $HOSTFILE is the template; training the $MODEL preset on this machine with $where" >&2
else
  LAUNCH=(--hostfile "$HOSTFILE" --force_multi)
  [ -n "${GPUS_PER_NODE:-}" ] && LAUNCH+=(--num_gpus "$GPUS_PER_NODE")
  DS_CONFIG=${DS_CONFIG:-config/deepspeed.json}
  MODEL=${MODEL:-7b}
  MAX_LENGTH=${MAX_LENGTH:-4096}
  MAX_STEPS=${MAX_STEPS:-100000}
  SAVE_DIR=${SAVE_DIR:-checkpoints/$MODEL}
fi

exec deepspeed "${LAUNCH[@]}" --master_port "$MASTER_PORT" train.py \
  --deepspeed --deepspeed_config "$DS_CONFIG" \
  --model_config "$MODEL" \
  --data_dir "$DATA_DIR" \
  --tokenizer_path "$TOKENIZER" \
  --max_length "$MAX_LENGTH" \
  --max_steps "$MAX_STEPS" \
  --checkpoint_saving_path "$SAVE_DIR" \
  "$@"
