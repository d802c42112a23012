#!/usr/bin/env bash
# The small CPU run whose test Dice the README quotes, in one command: 16 classic 128-px phantoms made with
# data seed SEED, `qnkit train` with every default but 16 filters, then `qnkit evaluate` on its test split
# (3 held-out phantoms; the mask `qnkit segment` writes, and the network's raw mask beside it).
#
#   bash benchmarks/small_run.sh [SEED] [WORK] [qnkit train options ...]
#
# SEED defaults to 0, WORK to runs/small-SEED (phantoms in WORK/data, the run in WORK/run, the figures in
# WORK/evaluation.json and WORK/cpu.txt). Extra options go to `qnkit train`, e.g. `--lr 3e-3 --schedule poly`.
# About 30 minutes on 2 CPU cores; training is deterministic on one CPU model, but CPUs with other vector
# units (AVX2 against AVX-512) round differently and end a few hundredths apart.
set -euo pipefail
SEED=${1:-0}
WORK=${2:-runs/small-$SEED}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$WORK"
{ lscpu | grep -E "^Model name|^CPU\(s\)" || true; nproc; } > "$WORK/cpu.txt"
[ -f "$WORK/data/kits.json" ] || qnkit synth --cases 16 --size 128 --seed "$SEED" "$WORK/data" --no-progress
qnkit train --data "$WORK/data" --out "$WORK/run" --num-filters 16 --no-progress "$@"
qnkit evaluate "$WORK/run" --json "$WORK/evaluation.json"
