#!/usr/bin/env bash
# Submit a config's run: checks it, then `sbatch slurm/pretrain_kla.sh` with the nodes and tasks its
# layout names (parallel.tensor x pipeline x context x data GPUs, one task per GPU).
#
#   bash slurm/submit.sh CONFIG [--chain N] [section.key=value ...] [-- SBATCH_OPTION ...]
#
#   --chain N      submit N jobs, each starting when the previous one ended well (afterok): for a run
#                  longer than the time limit where jobs may not requeue themselves. Each job checkpoints
#                  at Slurm's warning before its limit and ends; the next resumes from that checkpoint.
#   GPUS_PER_NODE  GPUs of a node (default 8)
#   GPU_MEMORY     GiB of one GPU: refuse, before submitting, a layout the estimate says cannot fit it
#   OUTPUT_DIR, DATA_MANIFEST, PYTHON   passed on to the job (see slurm/pretrain_kla.sh)
#
# Everything after `--` goes to sbatch (e.g. --partition=gpu --time=12:00:00 --account=...); SBATCH_*
# variables work as usual.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/slurm/checkout.sh"
[ $# -ge 1 ] || { echo "usage: bash slurm/submit.sh CONFIG [--chain N] [section.key=value ...] [-- SBATCH_OPTION ...]" >&2; exit 2; }
CONFIG=$1
shift
CHAIN=1
OVERRIDES=()
SBATCH_OPTIONS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --chain) CHAIN=$2; shift 2 ;;
    --) shift; SBATCH_OPTIONS=("$@"); break ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done
CHECKED=("${OVERRIDES[@]}")
[ -n "${OUTPUT_DIR:-}" ] && CHECKED+=("output_dir=\"$OUTPUT_DIR\"")
[ -n "${DATA_MANIFEST:-}" ] && CHECKED+=("data.manifest=\"$DATA_MANIFEST\"")

layout=$("$PYTHON" -m pretrain.preflight --config "$CONFIG" --nodes-for "${GPUS_PER_NODE:-8}" \
  ${GPU_MEMORY:+--gpu-memory "$GPU_MEMORY"} "${CHECKED[@]}") || exit 2
read -r NODES TASKS <<<"$(echo "$layout" | tail -n 1)"
export CONFIG
[ "$CHAIN" -gt 1 ] && export REQUEUE=0

previous=
for ((i = 1; i <= CHAIN; i++)); do
  dependency=()
  [ -n "$previous" ] && dependency=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
  previous=$(sbatch --parsable --nodes="$NODES" --ntasks-per-node="$TASKS" --gpus-per-node="$TASKS" \
    "${dependency[@]}" "${SBATCH_OPTIONS[@]}" slurm/pretrain_kla.sh "${OVERRIDES[@]}")
  previous=${previous%%;*}
  echo "submitted job $previous: $CONFIG on $NODES node(s) x $TASKS task(s)${dependency:+, after the previous job}"
done
echo "watch it: squeue -u \$USER; sacct -j $previous; tail -f kla-pretrain-$previous.out (the job's output file)"
