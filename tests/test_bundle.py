"""qnkit.bundle: reading, hash verification, engine-target checks; one-line CLI errors."""
from __future__ import annotations

import json
import shutil

import pytest

import torch  # noqa: F401
import onnxruntime  # noqa: E402,F401  (segmenting needs it: missing is an error, not a skip)

from qnkit.bundle import (BundleError, engine_mismatch, load_bundle, sealed_metadata_text,  # noqa: E402
                          sha256_file)


@pytest.fixture(scope="module")
def original(shared_bundle):
    return shared_bundle[1]


@pytest.fixture
def copy(original, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(original, dst)
    return dst


def _one_line_exit_2(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    for needle in needles:
        assert needle in proc.stderr


def test_load_bundle_reads_the_interface(original):
    b = load_bundle(original)
    assert b.hu_window == (-200.0, 400.0) and b.input_size == (64, 64) and b.size_divisor == 16
    assert b.threshold == 0.5 and b.network["num_filters"] == 8 and b.dynamic_hw
    assert b.artefact("model.onnx") == original / "model.onnx"
    assert b.engine is None and not b.has("model.engine")
    with pytest.raises(BundleError, match="has no model.engine"):
        b.artefact("model.engine")


def test_tampered_artefact_is_detected(copy, run_qnkit):
    with open(copy / "model.onnx", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match="SHA-256 does not match"):
        load_bundle(copy)
    lazy = load_bundle(copy, verify=False)  # checked on first use instead
    lazy.artefact("weights.safetensors")
    with pytest.raises(BundleError, match="model.onnx: SHA-256"):
        lazy.artefact("model.onnx")
    _one_line_exit_2(run_qnkit("export", "--check", copy), "SHA-256")


def test_missing_files_and_bad_metadata(copy, tmp_path, run_qnkit):
    (copy / "model.fp16.onnx").unlink()
    with pytest.raises(BundleError, match="model.fp16.onnx: missing"):
        load_bundle(copy)
    _one_line_exit_2(run_qnkit("export", "--check", copy), "missing")
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "nope")
    meta = json.loads((copy / "qnkit.json").read_text())
    (copy / "qnkit.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        load_bundle(copy)
    (copy / "qnkit.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(BundleError, match="version 99"):
        load_bundle(copy)
    (copy / "qnkit.json").unlink()
    with pytest.raises(BundleError, match="no qnkit.json"):
        load_bundle(copy)


def test_segment_cli_refuses_a_tampered_bundle(copy, tmp_path, run_qnkit):
    from qnkit.synth import write_case, make_case

    write_case(make_case(0, size=64, seed=3), tmp_path / "cases")
    (copy / "weights.safetensors").write_bytes(b"not the weights")
    proc = run_qnkit("segment", next((tmp_path / "cases").glob("case_*")), "--model", copy, "--out",
                     tmp_path / "mask.nii.gz", "--no-progress")
    _one_line_exit_2(proc, "weights.safetensors")
    assert not (tmp_path / "mask.nii.gz").exists()


def _with_engine(bundle_dir, record):
    """Add a (fake) engine artefact and its record to a copied bundle."""
    (bundle_dir / "model.engine").write_bytes(b"engine bytes")
    meta = json.loads((bundle_dir / "qnkit.json").read_text())
    profile = {"input": "image", "min": [1, 1, 16, 16], "opt": [16, 1, 64, 64], "max": [32, 1, 128, 128]}
    meta["engine"] = {"file": "model.engine", "precision": "fp16", "profile": profile, **record}
    meta["artefacts"]["model.engine"] = {"sha256": sha256_file(bundle_dir / "model.engine"), "bytes": 12}
    (bundle_dir / "qnkit.json").write_text(sealed_metadata_text(meta))  # re-sealed, as export would
    return load_bundle(bundle_dir)


HERE = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_engine_from_another_tensorrt_version_is_never_run(copy):
    from qnkit.backends.tensorrt_backend import select_engine

    b = _with_engine(copy, {**HERE, "tensorrt": "8.6.1"})
    with pytest.raises(BundleError, match=r"built for TensorRT 8\.6\.1.*this machine has TensorRT 10\.3\.0") as exc:
        select_engine(b, HERE, "fp16", rebuild=False)
    assert "\n" not in str(exc.value)
    choice, why = select_engine(b, HERE, "fp16")
    assert choice == "rebuild" and "8.6.1" in why


def test_engine_for_this_machine_is_used_and_other_gpus_rebuild(copy):
    from qnkit.backends.tensorrt_backend import select_engine

    b = _with_engine(copy, HERE)
    assert select_engine(b, HERE, "fp16", rebuild=False)[0] == "bundle"
    assert select_engine(b, HERE, "fp32")[0] == "rebuild"  # precision differs
    other = {**HERE, "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    assert "compute capability 8.0" in engine_mismatch(b.engine, tensorrt_version=other["tensorrt"],
                                                        gpu_name=other["gpu"],
                                                        compute_capability=other["compute_capability"])
    assert select_engine(b, other, "fp16")[0] == "rebuild"


def test_check_cli_summarises_a_good_bundle(original, run_qnkit):
    proc = run_qnkit("export", "--check", original)
    assert proc.returncode == 0, proc.stderr
    assert "SHA-256 verified" in proc.stdout and "fp16" in proc.stdout


def _edit_metadata(bundle_dir, edit):
    meta = json.loads((bundle_dir / "qnkit.json").read_text())
    edit(meta)
    (bundle_dir / "qnkit.json").write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize("what, edit", [
    ("threshold", lambda m: m.update(threshold=0.3)),
    ("HU window", lambda m: m["preprocessing"].update(hu_window=[-100.0, 300.0])),
    ("network config", lambda m: m["model"]["network"].update(num_filters=16)),
    ("a new key", lambda m: m.update(domain={"pixel_spacing_mm": 1.0})),
    ("an artefact hash", lambda m: m["artefacts"]["model.onnx"].update(sha256="0" * 64)),
    ("the manifest hash removed", lambda m: m.pop("manifest_sha256")),
])
def test_an_edited_qnkit_json_is_refused(copy, what, edit):
    _edit_metadata(copy, edit)
    with pytest.raises(BundleError, match="manifest_sha256"):
        load_bundle(copy, verify=False)


def test_an_edited_qnkit_json_is_one_line_and_exit_2_in_every_command(copy, tmp_path, run_qnkit):
    _edit_metadata(copy, lambda m: m.update(threshold=0.3))
    _one_line_exit_2(run_qnkit("verify", copy), "qnkit.json", "manifest_sha256")
    from qnkit.synth import make_case, write_case

    write_case(make_case(0, size=64, seed=3), tmp_path / "cases")
    proc = run_qnkit("segment", next((tmp_path / "cases").glob("case_*")), "--model", copy, "--out",
                     tmp_path / "mask.nii.gz", "--no-progress")
    _one_line_exit_2(proc, "manifest_sha256")
    assert not (tmp_path / "mask.nii.gz").exists()


def test_layout_of_qnkit_json_does_not_matter(copy):
    meta = json.loads((copy / "qnkit.json").read_text())
    reordered = dict(reversed(list(meta.items())))
    (copy / "qnkit.json").write_text(json.dumps(reordered, indent=4, sort_keys=False))
    assert load_bundle(copy).threshold == 0.5  # same content, other layout: still the signed-off bundle


def test_verify_cli_prints_what_was_checked(original, run_qnkit):
    proc = run_qnkit("verify", original)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((original / "qnkit.json").read_text())
    assert f"manifest_sha256 {meta['manifest_sha256'][:16]}" in proc.stdout
    for name, record in meta["artefacts"].items():
        assert f"ok  {name}: {record['bytes']:,} bytes, SHA-256 {record['sha256'][:16]}" in proc.stdout
    assert "trust boundary" in proc.stdout


@pytest.mark.parametrize("kind, artefact", [("onnxruntime", "model.onnx"), ("torch", "weights.safetensors")])
def test_loaders_run_the_bytes_they_verified(copy, kind, artefact):
    """A file swapped after load_bundle checked it is caught when the backend reads it (no reopen gap)."""
    from qnkit.backends import open_backend

    bundle = load_bundle(copy, verify=True)
    (copy / artefact).write_bytes((copy / artefact).read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match=f"{artefact}: SHA-256"):
        open_backend(bundle, kind, device="cpu", precision="fp32", log=lambda m: None)
