#!/usr/bin/env bash
# Make .gpukits: a stand-in for the KiTS19 label folder that travels to a GPU machine (1.5 MB, not 65 MB).
# The whole-CT generator lists the case folders and reads only the one it draws (case_00106 for the bench's
# recipe), so empty placeholders for the others leave the draw, and the CT, byte-identical (checked by sha256).
set -euo pipefail
KITS=${1:-../shared/data/kits19-labels}
rm -rf .gpukits && mkdir .gpukits && cp "$KITS/kits.json" .gpukits/
for d in "$KITS"/case_*; do
  n=$(basename "$d"); mkdir ".gpukits/$n"
  if [ "$n" = case_00106 ]; then cp "$d/segmentation.nii.gz" ".gpukits/$n/"; else : > ".gpukits/$n/segmentation.nii.gz"; fi
done
grep -qx '/.gpukits/' .git/info/exclude 2>/dev/null || echo /.gpukits/ >> .git/info/exclude
