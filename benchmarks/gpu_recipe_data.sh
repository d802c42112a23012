#!/usr/bin/env bash
# Make .gpurecipe: what a GPU recipe (train/recipe.py, "machine": "gpu") needs on a GPU machine that sees
# no shared/ data: the KiTS19 label maps it draws its kidneys from (the first "kits_cases" cases, copied: links
# do not travel) with their kits.json entries, and the real validation CT with its labels (INT8 evidence and
# the real-CT figures). About 38 MB for kidney-synth-wide; the carry limit is 64 MiB with the wheels.
#   bash benchmarks/gpu_recipe_data.sh kidney-synth-wide ../shared/data
set -euo pipefail
NAME=${1:?usage: gpu_recipe_data.sh RECIPE SHARED_DATA}
SHARED=${2:-../shared/data}
COUNT=$(python3 -c "from qnkit.train.recipe import RECIPES; print(RECIPES['$NAME'].get('kits_cases', 0))")
if [ "$COUNT" -lt 1 ]; then
  echo "gpu_recipe_data.sh: recipe $NAME draws from all KiTS19 label maps (65 MB): too much to carry" >&2; exit 2
fi
rm -rf .gpurecipe && mkdir -p .gpurecipe/kits19-labels
for d in $(ls -d "$SHARED"/kits19-labels/case_* | sort | head -n "$COUNT"); do
  mkdir ".gpurecipe/kits19-labels/$(basename "$d")" && cp "$d/segmentation.nii.gz" ".gpurecipe/kits19-labels/$(basename "$d")/"
done
python3 - "$SHARED/kits19-labels/kits.json" .gpurecipe/kits19-labels <<'EOF'
import json, pathlib, sys
names = {p.name for p in pathlib.Path(sys.argv[2]).glob("case_*")}
entries = [e for e in json.loads(pathlib.Path(sys.argv[1]).read_text()) if e.get("case_id") in names]
(pathlib.Path(sys.argv[2]) / "kits.json").write_text(json.dumps(entries))
EOF
cp "$SHARED/real-ct/example_ct_sm.nii.gz" .gpurecipe/real-ct.nii.gz
cp "$SHARED/real-ct/example_seg.nii.gz" .gpurecipe/real-labels.nii.gz
grep -qx '/.gpurecipe/' .git/info/exclude 2>/dev/null || echo /.gpurecipe/ >> .git/info/exclude
du -sh .gpurecipe
