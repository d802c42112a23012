"""A large mass against a kidney must not be taken into it (the seed's convention: a mass that distorts the
kidney is not kidney): the shipped default model reports that kidney's volume within 15 % of what it reports
for the same body without the mass."""
from __future__ import annotations

from pathlib import Path

import pytest

KITS_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kits19-labels"


@pytest.mark.skipif(not KITS_LABELS.is_dir(), reason="needs the KiTS19 label maps in ../shared (CI has them)")
def test_a_large_mass_does_not_change_the_kidney_the_default_model_reports(tmp_path):
    from qnkit.benchmarks.mass_effect import measure
    from qnkit.models import find_model

    model = find_model()
    result = measure(str(model.path), cases=1, seed=0, labels_from=KITS_LABELS, workdir=tmp_path,
                     pixel_mm=2.0, thickness_mm=4.0)
    case = result["cases"][0]
    assert 300 <= case["mass_ml"] <= 700, case
    assert case["reported_without_ml"] > 0.5 * case["true_ml"], case  # the kidney is found at all
    assert abs(case["relative_change"]) < 0.15, case
