#!/usr/bin/env bash
# CI, after the editable install's test run: prove the distribution a user installs, not the checkout.
# Builds the sdist and, from it, the wheel (`python -m build`: the Cython kernels compile once, and a file
# missing from the sdist fails the wheel build); checks that the wheel holds every package setup.py
# finds; installs the wheel, not editable, into a fresh virtual environment (no torch: the runtime needs
# none) and runs from a folder outside the checkout: `qnkit models`, `qnkit verify` on the shipped default
# bundle, `qnkit segment` on a real NIfTI CT and on a DICOM series with DICOM SEG output.
#
# Run by .ci/run with the dev environment active (it has `build` and setuptools); any failing step fails CI.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED="$REPO/../shared"  # in CI, shared/ is a sibling of the clone
DEV_PYTHON=$(command -v python)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qnkit-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
started=$SECONDS

echo "wheel smoke: building the sdist and the wheel in $WORK/dist"
"$DEV_PYTHON" -m build --outdir "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/qnkit-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/qnkit-*.whl)
echo "wheel smoke: built $(basename "$SDIST") and $(basename "$WHEEL") in $((SECONDS - started)) s"

# Every package of setup.py's layout has its __init__.py in the wheel (read from setup.py, not re-listed).
"$DEV_PYTHON" - "$REPO" "$WHEEL" <<'EOF'
import importlib.util, sys, zipfile
repo, wheel = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("qnkit_setup_layout", f"{repo}/setup.py")
layout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layout)  # defines the layout only: setup() runs when the file is __main__
names = set(zipfile.ZipFile(wheel).namelist())
missing = [p for p in layout.discover_packages(repo) if p.replace(".", "/") + "/__init__.py" not in names]
assert not missing, f"packages missing from the wheel: {missing}"
assert "qnkit/models/registry.json" in names, "the model registry is missing from the wheel"
EOF

VENV="$WORK/venv"
python3 -m venv "$VENV"
# A constraint, should anything ever pull torch in: only the CPU build (an unpinned torch is a multi-GB CUDA build).
echo "torch==2.13.0" > "$WORK/constraints.txt"
"$VENV/bin/python" -m pip install --quiet -c "$WORK/constraints.txt" "${WHEEL}[cpu,dicom]"
"$VENV/bin/python" -m pip check

# From outside the checkout, so that nothing can be imported from it.
RUN="$WORK/run"
mkdir -p "$RUN"
cd "$RUN"
"$VENV/bin/python" - "$REPO" <<'EOF'
import sys
from pathlib import Path
import qnkit, qnkit.dicom
root = Path(qnkit.__file__).resolve().parent
assert Path(sys.argv[1]).resolve() not in root.parents, f"qnkit imported from the checkout: {root}"
assert "torch" not in sys.modules, "import qnkit must not import torch"
print(f"wheel smoke: qnkit {qnkit.__version__} from {root}")
EOF
QNKIT="$VENV/bin/qnkit"
"$QNKIT" models
DEFAULT_BUNDLE=$("$VENV/bin/python" -c "from qnkit.models import find_model; print(find_model().path)")
"$QNKIT" verify "$DEFAULT_BUNDLE"

if [ ! -d "$SHARED/data/real-ct" ]; then
    echo "wheel smoke: NOTICE: $SHARED/data/real-ct is absent; qnkit segment on real CT (NIfTI, DICOM) not run"
    echo "wheel smoke: done in $((SECONDS - started)) s"
    exit 0
fi
"$QNKIT" segment "$SHARED/data/real-ct/example_ct_sm.nii.gz" --out "$RUN/ct_kidneys.nii.gz" \
    --stats "$RUN/ct_stats.json" --no-progress

# The shared series has empty Study/Series/SOP Instance UIDs, so a SEG cannot reference it; the fixture
# writes it again as a complete scanner-like series. Without the fixture, the series is segmented to NIfTI.
if [ -f "$REPO/tests/fixtures/scanner_series.py" ]; then
    "$DEV_PYTHON" "$REPO/tests/fixtures/scanner_series.py" "$SHARED/data/real-ct/example_ct_dicom" "$RUN/series"
    "$QNKIT" segment "$RUN/series" --format seg,nifti --out "$RUN/dicom_out" --no-progress
    DICOM_FORMATS=seg,nifti
else
    echo "wheel smoke: NOTICE: tests/fixtures/scanner_series.py is absent; the shared DICOM series (no UIDs) is" \
         "segmented to NIfTI only, no SEG"
    "$QNKIT" segment "$SHARED/data/real-ct/example_ct_dicom" --format nifti --out "$RUN/dicom_out" --no-progress
    DICOM_FORMATS=nifti
fi

# The outputs exist and read back as what they claim to be.
"$VENV/bin/python" - "$RUN" "$SHARED/data/real-ct/example_ct_sm.nii.gz" "$DICOM_FORMATS" <<'EOF'
import json, sys
from pathlib import Path
import nibabel as nib
import numpy as np
run, ct_path, formats = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
mask = nib.load(run / "ct_kidneys.nii.gz")
assert mask.shape == nib.load(ct_path).shape, (mask.shape, nib.load(ct_path).shape)
assert np.asarray(mask.dataobj).any(), "the NIfTI CT's mask is empty"
json.loads((run / "ct_stats.json").read_text())
outputs = sorted(p.relative_to(run) for p in (run / "dicom_out").rglob("*") if p.is_file())
print("wheel smoke: DICOM outputs", [str(p) for p in outputs])
if "nifti" in formats:
    masks = [p for p in outputs if p.name.endswith(".nii.gz")]
    assert masks and np.asarray(nib.load(run / masks[0]).dataobj).any(), "no non-empty NIfTI mask from the DICOM series"
if "seg" in formats:
    import pydicom
    segs = [p for p in outputs if p.suffix == ".dcm"]
    assert segs, "no DICOM SEG written"
    seg = pydicom.dcmread(run / segs[0])
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4", (seg.Modality, seg.SOPClassUID)
EOF
echo "wheel smoke: done in $((SECONDS - started)) s"
