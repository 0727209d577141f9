#!/usr/bin/env bash
# Pretrain a KLA model on a Slurm cluster (any number of nodes), or on one machine with plain bash.
#
#   bash slurm/submit.sh configs/kla_1.3b.toml [section.key=value ...]  # sbatch with the nodes the config's layout names
#   CONFIG=configs/kla_0.4b.toml sbatch slurm/pretrain_kla.sh [...]     # the defaults below: one node of 8 GPUs
#   bash slurm/pretrain_kla.sh [...]                                    # here: torchrun over the GPUs, or one CPU process
#
#   CONFIG         TOML config (default: configs/tiny.toml on the embedded default corpus)
#   OUTPUT_DIR     checkpoints/, tb/ and logs (default: the config's output_dir); on Slurm it must be on a
#                  file system every node of the job sees
#   DATA_MANIFEST  a data_prep manifest.json (or blend manifest); with the default config the embedded
#                  corpus (the Python standard library's source) is prepared into $OUTPUT_DIR/data on first use,
#                  and the finished run is exported to $OUTPUT_DIR/hf (Hugging Face) with a greedy sample
#   NPROC          processes on this machine when run without Slurm (default: GPU count, else 1)
#   PYTHON         python to use (default: python3)
#   REQUEUE        1 (default): at Slurm's warning before the time limit, checkpoint and requeue this job;
#                  0: checkpoint and end (a job chain, `submit.sh --chain N`, continues the run)
#   GPU_MEMORY     GiB per GPU to check the layout against when the batch node has no GPU to ask
#
# Every run passes --resume, so a requeued, chained or re-run job continues from the newest
# checkpoint. On Slurm the job first checks its input once (pretrain/preflight.py: config, layout
# against the task count, data, tokenizer, output dir, memory estimate, one task per GPU) and that
# every node sees the output dir, so bad input fails in seconds with its reason in this job's output
# file. One task per GPU: each finds its rank, the world size and the master (the first node) from
# Slurm's environment (pretrain/distributed.py); NCCL settings a cluster may need: slurm/README.md.
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
[ -f "$ROOT/slurm/checkout.sh" ] || ROOT=$SLURM_SUBMIT_DIR  # sbatch runs a copy of this script from a spool directory
source "$ROOT/slurm/checkout.sh"
OVERRIDES=("$@")

TRAINING=
stop_and_requeue() {
  # Slurm's warning before the time limit: training checkpoints at the end of its current step and
  # exits; then the job goes back in the queue (or, in a chain, the next job takes over).
  echo "== USR1 before the time limit: checkpointing, then $([ "${REQUEUE:-1}" = 1 ] && echo "requeueing job ${SLURM_JOB_ID:-}" || echo "ending this job of the chain") (restart ${SLURM_RESTART_COUNT:-0})"
  if [ -n "$TRAINING" ]; then
    kill -USR1 "$TRAINING" 2>/dev/null || true
    wait "$TRAINING" || true
  fi
  if [ "${REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
}
trap stop_and_requeue USR1

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
  echo "== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST), config $CONFIG"
  preflight=$("$PYTHON" -m pretrain.preflight --config "$CONFIG" --gpus "$SLURM_NTASKS" \
    ${GPU_MEMORY:+--gpu-memory "$GPU_MEMORY"} "${OVERRIDES[@]}") || exit 2
  echo "$preflight" | grep -v '^output_dir='
  run_dir=$(echo "$preflight" | sed -n 's/^output_dir=//p')
  if [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then
    # Every node must see what the first writes (checkpoints are written by all ranks, resumed by all).
    # A new name: NFS clients look it up on the server instead of trusting a cached directory.
    seen="$run_dir/.nodes_see_this_$SLURM_JOB_ID"
    touch "$seen"
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c \
      'for _ in 1 2 3 4 5; do [ -e "$1" ] && exit 0; sleep 1; done
       echo "error: node $SLURMD_NODENAME does not see $1, which the first node wrote: the output dir is not shared between the nodes; set OUTPUT_DIR to a shared file system" >&2
       exit 1' _ "$seen" || { rm -f "$seen"; exit 2; }
    rm -f "$seen"
  fi
  # Slurm 22.05's srun no longer takes --cpus-per-task from the job; each task's threads get that many CPUs.
  export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
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
