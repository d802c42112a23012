"""`qnkit segment --ray`: the archive on Ray workers gives the local run's masks and stats; a bad case is
reported while the rest go on; a worker killed mid-case gets its case retried elsewhere, never half-written;
a rerun segments nothing new (the records verify) and --force redoes all; the local path never imports Ray.

One local Ray instance (2 CPUs, no dashboard) serves the module: the CLI joins it by its address (the
`--ray ADDRESS` path), the kill test drives :func:`qnkit.cluster.segment_on_ray` in-process with a test-only
slow hook installed in the workers through Ray's ``worker_process_setup_hook`` (nothing in qnkit), and the
--force rerun starts its own local instance (bare `--ray`). The model is a hand-built ONNX bundle (one 3x3
convolution and a sigmoid, sealed like an export): same backend and pipeline as a trained model, no torch
export to wait for.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")  # the [cluster] extra (in [dev]); the rest of qnkit needs no Ray

from qnkit import batch as B  # noqa: E402
from qnkit import io as qio  # noqa: E402

GOOD = [f"case_0000{i}" for i in range(5)]
BROKEN = "case_00099"
VOLATILE = ("timings_s", "slices_per_s", "inference_slices_per_s")


def _write_conv_bundle(folder: Path) -> Path:
    """A sealed qnkit bundle whose model.onnx is sigmoid(conv3x3(image)): bright tissue is 'kidney'."""
    from onnx import TensorProto, helper, numpy_helper

    from qnkit.bundle import FORMAT, VERSION, sealed_metadata_text, sha256_bytes

    weight = np.full((1, 1, 3, 3), 20.0 / 9.0, np.float32)
    bias = np.array([-20.0 * 0.55], np.float32)
    dims = ["batch", 1, "height", "width"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["z"], pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["z"], ["probability"])], "conv3x3",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, dims)],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(data)
    metadata = {
        "format": FORMAT, "version": VERSION,
        "model": {"architecture": "conv3x3 (test)", "network": {"num_filters": 1}, "input_size": [32, 32],
                  "dynamic_hw": True},
        "preprocessing": {"hu_window": [-200.0, 400.0], "size_divisor": 16, "downsample": 2, "pad_multiple": 16,
                          "pad_value": 0.0},
        "threshold": 0.5, "domain": None, "engine": None,
        "artefacts": {"model.onnx": {"sha256": sha256_bytes(data), "bytes": len(data)}},
    }
    (folder / "qnkit.json").write_text(sealed_metadata_text(metadata), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray_segment")


@pytest.fixture(scope="module")
def bundle(workdir) -> Path:
    return _write_conv_bundle(workdir / "bundle")


@pytest.fixture(scope="module")
def archive(synth_dataset, workdir) -> Path:
    """Six cases: five synthetic KiTS19 case folders and one whose imaging.nii.gz is a cut-off gzip stream."""
    folder = workdir / "archive"
    for name in GOOD:
        shutil.copytree(synth_dataset / name, folder / name)
    (folder / BROKEN).mkdir()
    data = (synth_dataset / GOOD[0] / "imaging.nii.gz").read_bytes()
    (folder / BROKEN / "imaging.nii.gz").write_bytes(data[: len(data) // 3])
    return folder


@pytest.fixture(scope="module")
def local_run(run_qnkit, archive, bundle, workdir) -> Path:
    """The local run of the archive (the reference): its masks and its --stats JSON."""
    out = workdir / "local"
    proc = run_qnkit("segment", archive, "--model", bundle, "--out", out, "--stats", workdir / "local.json",
                     "--no-progress")
    assert proc.returncode == 2, proc.stderr  # the broken case is bad input; the others are written
    assert f"qnkit: {BROKEN} failed:" in proc.stderr
    return out


def _slow_hook():
    """Runs in every Ray worker of this module's instance: loading the victim case takes 30 s the first time
    (time for the test to kill the worker); every load leaves a mark ``<case>.<pid>``."""
    import os
    import time
    from pathlib import Path

    import qnkit.batch as batch

    marks, victim = Path(os.environ["QNKIT_TEST_MARKS"]), os.environ["QNKIT_TEST_VICTIM"]
    original = batch.load_case

    def load_case(case, **kwargs):
        first = not any(marks.glob(f"{case.name}.*"))
        (marks / f"{case.name}.{os.getpid()}").write_text("")
        if case.name == victim and first:
            time.sleep(30)  # killed long before, unless the test failed to find it
        return original(case, **kwargs)

    batch.load_case = load_case


@pytest.fixture(scope="module")
def ray_cluster(workdir):
    """A local Ray instance with 2 CPUs for this module; yields its address."""
    marks = workdir / "marks"
    marks.mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": _slow_hook,
                          "env_vars": {"QNKIT_TEST_MARKS": str(marks), "QNKIT_TEST_VICTIM": GOOD[2],
                                       "QNKIT_NUM_THREADS": "1"}})
    try:
        yield ray.get_runtime_context().gcs_address, marks
    finally:
        ray.shutdown()


def _mask_bytes(path: Path) -> bytes:
    mask, _ = qio.load_labels(path)
    return np.ascontiguousarray(mask).tobytes()


def _stable(case: dict) -> dict:
    return {k: v for k, v in case.items() if k not in VOLATILE}


def _local_stats(workdir: Path) -> dict:
    return {c["name"]: c for c in json.loads((workdir / "local.json").read_text())["cases"]}


def test_ray_run_equals_the_local_run_and_reports_the_broken_case(run_qnkit, archive, bundle, local_run, workdir,
                                                                  ray_cluster):
    address, _ = ray_cluster
    out = workdir / "ray"
    proc = run_qnkit("segment", archive, "--model", bundle, "--out", out, "--ray", address, "--ray-workers", "2",
                     "--stats", workdir / "ray.json", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert f"qnkit: {BROKEN} failed:" in proc.stderr and "Traceback" not in proc.stderr
    assert "core_worker" not in proc.stderr  # no Ray log noise (e.g. about restarting workers)
    # 2 workers were started; the summary names those that opened the model before the last case ended
    # (on a loaded machine the first can finish all six tiny cases while the second is still opening)
    assert re.search(r"on [12] Ray worker\(s\)", proc.stdout) and "5 case(s) segmented, 1 failed" in proc.stdout
    local = _local_stats(workdir)
    ray_stats = {c["name"]: c for c in json.loads((workdir / "ray.json").read_text())["cases"]}
    assert set(ray_stats) == set(local) == {*GOOD, BROKEN}
    assert "error" in ray_stats[BROKEN]
    for name in GOOD:
        mask = out / f"{name}_kidneys.nii.gz"
        assert _mask_bytes(mask) == _mask_bytes(local_run / mask.name)
        record = json.loads((out / f"{name}_kidneys.json").read_text())
        expected = {**_stable(local[name]), "output": str(mask)}
        assert _stable(record["case"]) == _stable(ray_stats[name]) == expected
        assert record["model"]["manifest_sha256"] == json.loads((bundle / "qnkit.json").read_text())["manifest_sha256"]
        assert record["input"]["sha256"] == B.input_sha256(archive / name / "imaging.nii.gz")
        assert record["worker"]["backend"]["name"] == "onnxruntime"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_kidneys.{e}" for n in GOOD for e in ("json", "nii.gz"))


def test_rerun_segments_nothing_new_and_force_redoes_all(run_qnkit, archive, bundle, workdir):
    """Runs after the test above (same --out): the five good cases are up to date."""
    out = workdir / "ray"
    good = [archive / name for name in GOOD]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = run_qnkit("segment", *good, "--model", bundle, "--out", out, "--ray", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "nothing new to segment: 5 cases up to date" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # --force redoes every case, here on a local Ray instance that the bare --ray starts
    proc = run_qnkit("segment", "--ray", *good, "--model", bundle, "--out", out, "--force", "--ray-workers", "2",
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "5 case(s) segmented" in proc.stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(after) == set(before) and all(after[n] > before[n] for n in before)
    local = workdir / "local"
    for name in GOOD:
        assert _mask_bytes(out / f"{name}_kidneys.nii.gz") == _mask_bytes(local / f"{name}_kidneys.nii.gz")


def test_resume_redoes_only_a_changed_input_and_refuses_unvouched_outputs(run_qnkit, archive, bundle, local_run,
                                                                          workdir):
    """The skip logic is the library's (qnkit.batch.resume_plan), shared by the local path's --resume."""
    data = workdir / "resume_in"
    for name in GOOD[:3]:
        shutil.copytree(archive / name, data / name)
    out = workdir / "resume_out"
    args = ("segment", data, "--model", bundle, "--out", out, "--resume", "--no-progress")
    assert run_qnkit(*args).returncode == 0
    shutil.copy(archive / GOOD[3] / "imaging.nii.gz", data / GOOD[1] / "imaging.nii.gz")  # other bytes
    proc = run_qnkit(*args)
    assert proc.returncode == 0, proc.stderr
    assert "2 case(s) up to date, skipped; 1 to segment" in proc.stderr
    assert _mask_bytes(out / f"{GOOD[1]}_kidneys.nii.gz") == _mask_bytes(local_run / f"{GOOD[3]}_kidneys.nii.gz")
    # an output that no record vouches for is not replaced without --force
    (out / f"{GOOD[0]}_kidneys.json").unlink()
    proc = run_qnkit(*args)
    assert proc.returncode == 2 and "pass --force" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_worker_killed_mid_case_gets_its_case_retried_and_written_once(archive, bundle, local_run, workdir,
                                                                       ray_cluster):
    from qnkit import cluster as C
    from qnkit.bundle import load_bundle
    from qnkit.segment import SegmentOptions

    _, marks = ray_cluster
    cases, batch = B.resolve_cases([archive / name for name in GOOD])
    out = workdir / "killed"
    plan = B.plan_outputs(cases, batch, out=out, records=True)
    victim = GOOD[2]
    said: list[str] = []
    box: dict = {}

    def run():
        box["run"] = C.segment_on_ray(cases, load_bundle(bundle), SegmentOptions(), outputs=plan, log=said.append,
                                      cluster=C.ClusterOptions(workers=2, retries=2))

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    while thread.is_alive() and killed is None:
        seen = list(marks.glob(f"{victim}.*"))
        if seen:
            killed = int(seen[0].suffix[1:])
            os.kill(killed, signal.SIGKILL)  # the worker is inside the victim's load: mid-case
        time.sleep(0.05)
    thread.join()
    assert killed is not None, "the victim case was never started"
    done = box["run"].done
    assert not done.failures and [r.name for r in done.results] == GOOD
    assert box["run"].retried == 1 and len(box["run"].workers) == 2  # the restarted worker replaced itself
    assert any(f"{victim}: its worker died" in line and "retrying on another worker" in line for line in said)
    attempts = sorted(int(p.suffix[1:]) for p in marks.glob(f"{victim}.*"))
    assert len(attempts) == 2 and killed in attempts
    record = json.loads((out / f"{victim}_kidneys.json").read_text())
    assert record["worker"]["pid"] != killed
    for name in GOOD:  # every case written once and whole, as the local run wrote it
        assert _mask_bytes(out / f"{name}_kidneys.nii.gz") == _mask_bytes(local_run / f"{name}_kidneys.nii.gz")
        if name != victim:
            assert len(list(marks.glob(f"{name}.*"))) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_kidneys.{e}" for n in GOOD for e in ("json", "nii.gz"))


def test_ray_address_is_optional_on_the_command_line(archive):
    from qnkit.commands.segment import ray_address_argv

    assert ray_address_argv(["segment", "--ray"]) == ["segment", "--ray=auto"]
    assert ray_address_argv(["segment", "--ray", "--out", "x"]) == ["segment", "--ray=auto", "--out", "x"]
    assert ray_address_argv(["segment", "--ray", str(archive)]) == ["segment", "--ray=auto", str(archive)]
    assert ray_address_argv(["segment", "--ray", "10.0.0.1:6379", "a"]) == ["segment", "--ray", "10.0.0.1:6379", "a"]
    assert ray_address_argv(["segment", "--ray", "ray://head:10001"]) == ["segment", "--ray", "ray://head:10001"]
    assert ray_address_argv(["segment", "--ray", "auto", "a"]) == ["segment", "--ray", "auto", "a"]


def test_the_local_path_never_imports_ray(archive, bundle, workdir):
    import subprocess

    out = workdir / "no_ray"
    code = ("import sys\nfrom qnkit.cli import main\n"
            f"try:\n    main(['segment', {str(archive / GOOD[0])!r}, '--model', {str(bundle)!r}, '--out', "
            f"{str(out)!r}, '--resume', '--no-progress'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'ray' not in sys.modules, 'the local path imported ray'\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "QNKIT_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
    assert (out / f"{GOOD[0]}_kidneys.nii.gz").is_file()


def test_an_address_where_no_cluster_answers_is_one_clear_error():
    import socket

    from qnkit import cluster as C
    from qnkit.errors import QnkitInputError

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(QnkitInputError, match="no Ray cluster answers there"):
        C._probe(f"127.0.0.1:{port}")
    with pytest.raises(QnkitInputError, match="no Ray cluster answers there"):
        C._probe(f"ray://127.0.0.1:{port}")
