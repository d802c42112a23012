#!/usr/bin/env bash
# Train a GPU recipe of train/recipe.py ("machine": "gpu", e.g. kidney-synth-wide) on a lent GPU machine
# (the `device` tool) in one command: make its phantoms on every core, train until the recipe's epochs or
# TRAIN_S seconds (default 270), then evaluate the best checkpoint on the held-out phantoms, export it and
# segment the real validation CT (INT8 evidence and figures). What comes back in $OUT: log.txt, epochs.txt,
# evaluation.json, bundle.tar.gz and the run (checkpoints with optimiser state, metrics, settings; not the
# phantoms or the preprocessed cache) as run.tar.gz.part-* (15 MiB pieces).
#
# Prepare here once (that machine reaches no package index and sees no shared/ data):
#   wheels as benchmarks/gpu_session.sh says (.whl: nibabel, connected-components-3d, isal)
#   bash benchmarks/gpu_recipe_data.sh kidney-synth-wide ../shared/data        # -> .gpurecipe
# then run(command="bash benchmarks/gpu_recipe.sh kidney-synth-wide", carry=[".whl", ".gpurecipe"], timeout_s=590).
# Finish it here, from the files that came back (FILES_AT), without making the phantoms again:
#   mkdir -p WORK && cat FILES_AT/run.tar.gz.part-* | tar -xzf - -C WORK && tar -xzf FILES_AT/bundle.tar.gz -C WORK
#   cp FILES_AT/evaluation.json WORK/
#   python -m qnkit.train.recipe kidney-synth-wide --workdir WORK --epochs "$(cat FILES_AT/epochs.txt)" \
#       --real-ct ../shared/data/real-ct/example_ct_sm.nii.gz --real-labels ../shared/data/real-ct/example_seg.nii.gz
# A run stopped by TRAIN_S keeps its last finished epoch; a later GPU session resumes it with WORK's run carried.
set -uo pipefail
NAME=${1:?usage: gpu_recipe.sh RECIPE [TRAIN_S]}
TRAIN_S=${2:-270}
OUT=${OUT:-/tmp/qnkit-gpu-out}
W=${QNKIT_RECIPE_WORKDIR:-/tmp/qnkit-recipe}
DATA=${QNKIT_RECIPE_DATA:-.gpurecipe}
mkdir -p "$OUT" "$W"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; nproc; } | tee "$LOG"
python3 -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/build.txt" 2>&1 \
  || { tail -20 "$OUT/build.txt"; exit 1; }
rm -f "$OUT/build.txt"
recipe() { python3 -m qnkit.train.recipe "$NAME" --workdir "$W" "$@"; }
stamp() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

stamp "synth ($(nproc) workers)"
recipe --kits-labels "$DATA/kits19-labels" --workers "$(nproc)" --until synth >> "$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
stamp "train (at most ${TRAIN_S} s)"
timeout -s TERM -k 30 "$TRAIN_S" python3 -m qnkit.train.recipe "$NAME" --workdir "$W" --until train \
  >> "$LOG" 2>&1
stamp "train exit $? ($(grep -c . "$W/run/metrics.jsonl" 2>/dev/null || echo 0) epochs in metrics.jsonl)"
EPOCHS=$(python3 -c "from pathlib import Path; from qnkit.train.recipe import trained_epochs; print(trained_epochs(Path('$W/run')))")
echo "$EPOCHS" > "$OUT/epochs.txt"
# the run first, so that it comes back even if the steps below outlast the call
tar -czf - -C "$W" --exclude=run/cache --exclude=run/tensorboard run | split -b 15M - "$OUT/run.tar.gz.part-"
if [ "$EPOCHS" -gt 0 ]; then  # (--epochs 0 would mean the recipe's own count: training again, unbounded)
  stamp "evaluate, export, validate on the real CT (epochs $EPOCHS)"
  recipe --epochs "$EPOCHS" --real-ct "$DATA/real-ct.nii.gz" --real-labels "$DATA/real-labels.nii.gz" >> "$LOG" 2>&1
  stamp "finish exit $?"
fi
[ -f "$W/evaluation.json" ] && cp "$W/evaluation.json" "$OUT/"
[ -d "$W/bundle" ] && tar -czf "$OUT/bundle.tar.gz" -C "$W" bundle
ls -la "$OUT" | tee -a "$LOG"
