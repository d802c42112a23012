"""qnkit.domain: each out-of-domain check fires on its case and stays quiet on an ordinary CT."""
import nibabel as nib
import numpy as np
import pytest

from qnkit import domain as D
from qnkit import io as qio
from qnkit.synth import make_case

DOMAIN = {"pixel_spacing_mm": 1.6, "slice_thickness_mm": [1.0, 5.0], "hu_window": [-200.0, 400.0]}


@pytest.fixture(scope="module")
def case():
    return make_case(2, size=64, seed=3)


def test_an_ordinary_synthetic_ct_gives_no_warning(case):
    geometry = qio.Geometry.from_affine(case.affine, case.imaging.shape)
    domain = {**DOMAIN, "slice_thickness_mm": [geometry.spacing[0]] * 2}
    assert D.input_warnings(case.imaging, geometry, domain) == []
    assert D.input_warnings(case.imaging, geometry, None) == []  # an old bundle: no thickness range to check


def test_values_that_are_not_hounsfield_units(case):
    ct = case.imaging
    assert D.hu_warning(ct) is None
    assert "none negative" in D.hu_warning((ct.astype(np.int32) + 1024).astype(np.uint16))  # unscaled unsigned
    assert "none negative" in D.hu_warning(np.random.default_rng(0).integers(0, 4000, (4, 8, 8)).astype(np.int16))  # MR-like
    assert "not CT Hounsfield units" in D.hu_warning(((ct + 1024) / 4095).astype(np.float32))  # normalised to [0, 1]
    assert "none below -500" in D.hu_warning(np.clip(ct, -300, None))  # no air anywhere


def test_slice_thickness_far_outside_the_training_range():
    assert D.thickness_warning(3.0, DOMAIN) is None
    assert D.thickness_warning(0.5, DOMAIN) is None and D.thickness_warning(10.0, DOMAIN) is None  # 2x margin
    assert "far outside" in D.thickness_warning(0.4, DOMAIN)
    assert "far outside" in D.thickness_warning(10.5, DOMAIN)
    assert D.thickness_warning(0.1, None) is None and D.thickness_warning(0.1, {"pixel_spacing_mm": 1}) is None


def test_orientation_guessed_when_qform_and_sform_codes_are_zero(case, tmp_path):
    nib.save(nib.Nifti1Image(case.imaging, case.affine), tmp_path / "coded.nii.gz")
    header = nib.Nifti1Header()  # voxel sizes only: no affine, qform and sform codes 0
    header.set_data_shape(case.imaging.shape)
    header.set_zooms(tuple(float(z) for z in np.linalg.norm(case.affine[:3, :3], axis=0)))
    nib.save(nib.Nifti1Image(case.imaging, None, header), tmp_path / "uncoded.nii.gz")
    coded, uncoded = qio.load_geometry(tmp_path / "coded.nii.gz"), qio.load_geometry(tmp_path / "uncoded.nii.gz")
    assert not coded.orientation_guessed and D.orientation_warning(coded) is None
    assert uncoded.orientation_guessed and "orientation guessed" in D.orientation_warning(uncoded)
    ct, geometry = qio.load_image(tmp_path / "uncoded.nii.gz")
    assert any("orientation guessed" in w for w in D.input_warnings(ct, geometry, None))


@pytest.mark.parametrize("where, expected", [((0, 5, 5), "first slice"), ((-1, 5, 5), "last slice"),
                                             ((3, 0, 5), "in-plane border"), ((3, 5, -1), "in-plane border")])
def test_kidney_touching_the_volume_edge(where, expected):
    mask = np.zeros((6, 10, 10), np.uint8)
    mask[2:4, 3:7, 3:7] = 1
    assert D.edge_warnings(mask) == [] and D.edge_warnings(np.zeros_like(mask)) == []
    mask[where] = 2
    (warning,) = D.edge_warnings(mask)
    assert expected in warning and "underestimated" in warning
