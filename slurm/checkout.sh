# Sourced by the scripts in slurm/ once ROOT is the checkout: they run from it, with its packages first.
cd "$ROOT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
