#!/usr/bin/env bash
# Pretrain a KLA model: `sbatch slurm/pretrain_kla.sh [section.key=value ...]` on a Slurm cluster,
# or `bash slurm/pretrain_kla.sh` on one machine (torchrun over its GPUs, or one CPU process).
#
#   CONFIG       TOML config (default: configs/tiny.toml on the embedded default corpus)
#   OUTPUT_DIR   where TensorBoard events (tb/), checkpoints/ and logs go (default: the config's)
#   DATA_MANIFEST  a data_prep manifest.json; with the default config the embedded corpus (the
#                Python standard library's source) is prepared into $OUTPUT_DIR/data on first use
#   NPROC        processes on this machine when run without Slurm (default: GPU count, else 1)
#   PYTHON       python to use (default: python3)
#
# The job always resumes from the newest checkpoint in OUTPUT_DIR, so a requeued or re-run job
# continues where it stopped. Before the time limit Slurm sends USR1; the job requeues itself.
#
#SBATCH --job-name=kla-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/slurm/pretrain_kla.sh" ]; then
  ROOT=$SLURM_SUBMIT_DIR  # sbatch runs a copy of this script from a spool directory
fi
cd "$ROOT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OVERRIDES=("$@")

TRAINING=
requeue() {
  # Slurm's warning before the time limit: training checkpoints at the end of its current step and
  # exits; then the job goes back in the queue and resumes from that checkpoint.
  echo "== USR1 before the time limit: checkpointing, then requeueing job ${SLURM_JOB_ID:-} (restart ${SLURM_RESTART_COUNT:-0})"
  if [ -n "$TRAINING" ]; then
    kill -USR1 "$TRAINING" 2>/dev/null || true
    wait "$TRAINING" || true
  fi
  [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

EMBEDDED_DEFAULT=
if [ -z "${CONFIG:-}" ]; then
  CONFIG=configs/tiny.toml
  EMBEDDED_DEFAULT=1
  OUTPUT_DIR=${OUTPUT_DIR:-outputs/tiny}
  if [ -z "${DATA_MANIFEST:-}" ]; then
    DATA_MANIFEST=$OUTPUT_DIR/data/manifest.json
    echo "== embedded default corpus -> $OUTPUT_DIR/data"
    "$PYTHON" -m data_prep default-corpus --output "$OUTPUT_DIR/data"
  fi
fi
[ -n "${OUTPUT_DIR:-}" ] && OVERRIDES+=("output_dir=\"$OUTPUT_DIR\"")
[ -n "${DATA_MANIFEST:-}" ] && OVERRIDES+=("data.manifest=\"$DATA_MANIFEST\"")
TRAIN=(-m pretrain --config "$CONFIG" --resume "${OVERRIDES[@]}")

if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  echo "== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT"
  # In the background so the USR1 trap runs while training does; srun passes USR1 on to every task.
  srun --kill-on-bad-exit=1 "$PYTHON" "${TRAIN[@]}" &
  TRAINING=$!
  wait "$TRAINING"
else
  if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
  fi
  echo "== local run: $NPROC process(es), config $CONFIG"
  if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "${TRAIN[@]}"
  else
    "$PYTHON" "${TRAIN[@]}"
  fi
fi

if [ -n "$EMBEDDED_DEFAULT" ] && ! [ "$OUTPUT_DIR/hf/model.safetensors" -nt "$OUTPUT_DIR/checkpoints/latest" ]; then
  # The embedded default ends as a Hugging Face model folder (unless it already holds the latest checkpoint),
  # and continues a prompt through plain transformers.
  "$PYTHON" -m kla_megatron.export_hf --checkpoint "$OUTPUT_DIR/checkpoints" --output "$OUTPUT_DIR/hf" --overwrite
  "$PYTHON" - "$OUTPUT_DIR/hf" <<'SAMPLE'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
prompt = tokenizer("def ", return_tensors="pt")
print("== greedy sample:\n" + tokenizer.decode(model.generate(**prompt, max_new_tokens=48, do_sample=False)[0]))
SAMPLE
fi
