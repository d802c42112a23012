"""benchmarks.sinus_taken: the share of the sinus and of the hilum's tubes a mask takes, on regenerated phantoms."""
from __future__ import annotations

import numpy as np
import pytest

from qnkit.benchmarks.sinus_taken import taken_shares
from qnkit.synth.atlas import LABEL


def test_shares_count_the_sinus_and_the_hilum_beside_the_kidney():
    labels = np.zeros((20, 30, 30), dtype=np.uint8)
    labels[5:15, 5:15, 5:15] = 1
    tissue = np.where(labels > 0, LABEL["kidney_right"], LABEL["body"]).astype(np.uint8)
    tissue[8:12, 8:12, 12:15] = LABEL["renal_sinus"]
    labels[8:12, 8:12, 12:15] = 0
    tissue[8:12, 8:12, 10:12] = LABEL["renal_pelvis"]
    labels[8:12, 8:12, 10:12] = 0
    tissue[9:11, 9:11, 15:29] = LABEL["vein"]  # runs on past the counted reach
    sinus = np.isin(tissue, [LABEL["renal_sinus"], LABEL["renal_pelvis"]])
    kidney = labels > 0
    filled = taken_shares(kidney | sinus, tissue, labels)
    assert filled["sinus_taken"] == 1.0 and filled["sinus_voxels"] == sinus.sum()
    assert filled["hilum_voxels"] == 2 * 2 * 4 and filled["hilum_taken"] == 0.0  # 4 voxels of vein beside it
    assert filled["dice"] == pytest.approx(2 * kidney.sum() / (kidney.sum() + sinus.sum() + kidney.sum()), abs=1e-4)
    half = kidney.copy()
    half[:, :, 12:14] |= sinus[:, :, 12:14]
    assert taken_shares(half, tissue, labels)["sinus_taken"] == pytest.approx(
        (sinus[:, :, 12:14]).sum() / sinus.sum(), abs=1e-4)
    from qnkit.benchmarks.sinus_taken import labels_through_grid

    same = labels_through_grid(labels, 2.5, 2.5)
    assert same.shape == labels.shape and np.array_equal(same, labels > 0)
    coarse = labels_through_grid(labels, 1.0, 5.0)  # a 5-voxel grid: the 3-voxel-wide sinus closes over
    assert coarse.shape == labels.shape and coarse[sinus].mean() > 0.5 and coarse[kidney].mean() > 0.8
    plain = np.where(labels > 0, LABEL["kidney_right"], LABEL["body"]).astype(np.uint8)
    none = taken_shares(kidney, plain, labels)
    assert none["sinus_taken"] is None and none["hilum_taken"] is None and none["dice"] == 1.0


def test_false_positives_are_counted_by_the_tissue_drawn():
    from qnkit.benchmarks.sinus_taken import false_positives_by_tissue

    labels = np.zeros((6, 10, 10), dtype=np.uint8)
    labels[1:5, 2:6, 2:6] = 1
    tissue = np.where(labels > 0, LABEL["kidney_left"], LABEL["body"]).astype(np.uint8)
    tissue[1:5, 2:6, 6:9] = LABEL["spleen"]
    mask = labels > 0
    assert false_positives_by_tissue(mask, tissue, labels, 0.5) == {}
    mask[1:5, 2:6, 6:8] = True  # 32 spleen voxels
    mask[0, 0, 0] = True  # one body voxel: under the smallest mL reported
    assert false_positives_by_tissue(mask, tissue, labels, 0.25) == {"spleen": 8.0}
    assert false_positives_by_tissue(mask, tissue, labels, 0.25, smallest_ml=0.0) == {"spleen": 8.0, "body": 0.25}
