#!/usr/bin/env bash
# Tokenize a large corpus on many nodes: a Slurm array of `data_prep tokenize` tasks, one output
# dataset per input shard (file), then one job that blends them into a manifest for pretraining.
#
#   INPUT='corpus/*.jsonl.zst' TOKENIZER=tok/tokenizer.model OUTPUT_PREFIX=data/web bash slurm/prepare_data.sh [-- SBATCH_OPTION ...]
#
#   INPUT           input files, directories or quoted globs (as data_prep tokenize --input); every file is
#                   a shard and gets its own dataset, so the file names (without suffixes) must differ
#   TOKENIZER       tokenizer.model / tokenizer.json (train one first: python -m data_prep train-tokenizer)
#   OUTPUT_PREFIX   writes PREFIX_<file name>[_train|_valid].bin/.idx/.json and PREFIX.manifest.json
#   TASKS           array tasks (default: one per input file, at most 64); task I does files I, I+TASKS, ...
#   VALID_FRACTION  share of each shard's documents for validation (default 0.001; 0: none)
#   INPUT_FORMAT    jsonl | text | parquet when the file names do not tell (default: auto)
#   TOKENIZE_ARGS   more `data_prep tokenize` options, e.g. "--json-key content --workers 8"
#   PYTHON          python to use (default: python3)
#
# With bash, it checks the inputs and submits both jobs (the blend runs after every array task ended
# well); under Slurm it is one of them. Array tasks pass --resume, so a requeued or re-submitted task
# keeps the shards already complete. Train on the result with data.manifest=PREFIX.manifest.json.
#
#SBATCH --job-name=kla-data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --requeue
set -euo pipefail
set -f  # INPUT's globs are data_prep's to expand, on the compute nodes

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$ROOT/slurm/checkout.sh" ] || ROOT=$SLURM_SUBMIT_DIR  # sbatch runs a copy of this script from a spool directory
source "$ROOT/slurm/checkout.sh"
for name in INPUT TOKENIZER OUTPUT_PREFIX; do
  [ -n "${!name:-}" ] || { echo "error: set $name (see the top of slurm/prepare_data.sh)" >&2; exit 2; }
done
VALID_FRACTION=${VALID_FRACTION:-0.001}
INPUT_FORMAT=${INPUT_FORMAT:-auto}
read -r -a INPUTS <<<"$INPUT"
read -r -a MORE <<<"${TOKENIZE_ARGS:-}"
MANIFEST=$OUTPUT_PREFIX.manifest.json

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  shard=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
  echo "== array task $shard of ${SLURM_ARRAY_TASK_COUNT} (job ${SLURM_ARRAY_JOB_ID}) on $(hostname -s)"
  exec "$PYTHON" -m data_prep tokenize --input "${INPUTS[@]}" --input-format "$INPUT_FORMAT" --tokenizer "$TOKENIZER" --output-prefix "$OUTPUT_PREFIX" \
    --one-output-per-input --num-shards "$SLURM_ARRAY_TASK_COUNT" --shard-index "$shard" --resume \
    --valid-fraction "$VALID_FRACTION" --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}" "${MORE[@]}"
fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "== blend of the shards of $OUTPUT_PREFIX -> $MANIFEST"
  if [ "$VALID_FRACTION" = 0 ]; then
    exec "$PYTHON" -m data_prep blend --datasets "${OUTPUT_PREFIX}_*" --output "$MANIFEST"
  fi
  exec "$PYTHON" -m data_prep blend --datasets "${OUTPUT_PREFIX}_*_train" --valid-datasets "${OUTPUT_PREFIX}_*_valid" \
    --output "$MANIFEST"
fi

# Submitting: check the inputs and the tokenizer here, before anything queues.
[ "${1:-}" = "--" ] && shift
files=$("$PYTHON" -m data_prep list-inputs --input "${INPUTS[@]}" --input-format "$INPUT_FORMAT") || exit 2
shards=$(echo "$files" | wc -l)
[ -e "$TOKENIZER" ] || { echo "error: tokenizer $TOKENIZER does not exist; train one with python -m data_prep train-tokenizer" >&2; exit 2; }
TASKS=${TASKS:-$((shards < 64 ? shards : 64))}
export INPUT TOKENIZER OUTPUT_PREFIX VALID_FRACTION INPUT_FORMAT
array=$(sbatch --parsable --array="0-$((TASKS - 1))" "$@" slurm/prepare_data.sh)
array=${array%%;*}
blend=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes --job-name=kla-data-blend \
  --output=kla-data-blend-%j.out "$@" slurm/prepare_data.sh)
blend=${blend%%;*}
echo "submitted array job $array ($TASKS task(s) over $shards input file(s)) and blend job $blend after it"
echo "when both are done, train with data.manifest=$MANIFEST; watch: squeue -u \$USER; sacct -j $array,$blend"
