"""`qnkit listen` against a real PACS (Orthanc) and dcmtk's storescu: a scanner series uploaded to Orthanc
(REST, as a user does) and pushed to two nodes, one serving the default shipped model (no --model), one
``--model kidney-synth``; each node's SEG (and RTSTRUCT) found back in the same study in Orthanc; an unknown
calling AE title (``storescu -aet EVIL``) rejected and logged, allowed callers logged as accepted; a series
with a corrupt instance reported while the node goes on; clean shutdown on SIGTERM. The whole exchange runs
in tests/dicom_node_scenario.py inside a private network namespace (loopback only). Those tests are
skipped only when Orthanc or storescu is not installed (CI installs both, see .ci/run).

The scanner series comes from tests/fixtures/scanner_series.py (the shared series with every UID a
scanner fills in); its own test checks it is complete (dciodvfy), deterministic, and that the script's
command line works.

In-process tests of the node: each association logged once, accepted or rejected with its reason; a
restart resumes and delivers to a pynetdicom storage SCP on 127.0.0.1 (segmentation with the stand-in
predictor of tests/dicom_cases.py); received UIDs never become paths. `qnkit listen --model` resolves
as `qnkit segment` does and its errors point to `qnkit models`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dicom_cases as D
from fixtures.scanner_series import scanner_series

import pynetdicom  # noqa: F401
SCENARIO = Path(__file__).with_name("dicom_node_scenario.py")
SCANNER_SCRIPT = Path(__file__).with_name("fixtures") / "scanner_series.py"


def _in_private_network(command: list[str]) -> list[str]:
    """``command`` run in a new network namespace with only its loopback interface up."""
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"cannot make a private network namespace (unshare --net needs root): {probe.stderr.strip()}")
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "scenario", *command]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    for tool, package in (("Orthanc", "orthanc"), ("storescu", "dcmtk")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (Debian package {package}) is not installed")
    import pydicom

    root = tmp_path_factory.mktemp("node")
    scanner = root / "scanner"
    scanner_series(D.real_series_path(), scanner)
    good = D.referable_series(root / "good", decompress=True, every=2)  # 10 slices: the corrupt one's source
    corrupt = D.broken(good, root / "corrupt_src", "corrupt")
    for path in corrupt.iterdir():  # its own series, so that it is judged apart
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1099"
        ds.save_as(path)
    result = root / "result.json"
    proc = subprocess.run(_in_private_network([sys.executable, str(SCENARIO), str(scanner), str(corrupt),
                                               str(root / "work"), str(result)]),
                          capture_output=True, text=True, timeout=900)
    assert result.exists(), proc.stderr[-3000:]
    out = json.loads(result.read_text())
    if "error" in out:
        stderr = {f.name: f.read_text()[-3000:] for f in (root / "work").glob("*.stderr")}
        pytest.fail(f"{out['error']}\n{json.dumps(stderr, indent=1)}")
    return out


def _lines(log: list[str], *words: str) -> list[str]:
    return [line for line in log if all(word in line for word in words)]


def test_unknown_calling_ae_is_rejected_and_logged(scenario):
    evil = scenario["evil"]
    assert evil["rc"] != 0 and "calling ae title not recognised" in evil["output"].lower(), evil
    rejected = _lines(scenario["node"]["log"], "association from EVIL at 127.0.0.1:", "rejected")
    assert len(rejected) == 1 and rejected[0].endswith(
        "(called QNKIT) rejected: calling AE title not recognised (rejected permanent)"), rejected
    assert _lines(scenario["node"]["log"], "EVIL") == rejected  # nothing of it stored, nothing else logged
    assert [line for line in scenario["node"]["stderr"] if "EVIL" in line] == rejected  # --log file and stderr


def test_allowed_callers_are_logged_as_accepted(scenario):
    assert scenario["modality"]["rc"] == 0, scenario["modality"]
    log = scenario["node"]["log"]
    assert len(_lines(log, "association from MODALITY at 127.0.0.1:", "accepted")) == 1, log
    for name in ("node", "node-named"):  # Orthanc's push, and the nodes' own sends are not incoming ones
        accepted = _lines(scenario[name]["log"], "association from ", " accepted")
        assert _lines(accepted, "association from ORTHANC at 127.0.0.1:"), scenario[name]["log"]
    assert not _lines(log, "association from MODALITY", "rejected")


def test_scanner_series_round_trip_through_orthanc_rest(scenario):
    import highdicom as hd

    assert scenario["uploaded"] == 20
    for name in ("qnkit", "qnkit-named"):
        stored = scenario["stored"][name]
        assert (stored["InstancesCount"], stored["FailedInstancesCount"]) == (20, 0), stored
    assert scenario["study_modalities"] == ["CT", "RTSTRUCT", "SEG", "SEG"]
    assert len(scenario["seg_files"]) == 2
    for path in scenario["seg_files"]:
        seg = hd.seg.segread(path)
        assert seg.StudyInstanceUID == scenario["study_uid"]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == scenario["scanner_uid"]
    for name in ("node", "node-named"):
        assert scenario[name]["left_in_incoming"] == []  # delivered, so nothing kept


def test_listen_serves_with_default_and_named_model(scenario):
    from qnkit.models import find_model

    for name, model in (("node", find_model()), ("node-named", find_model("kidney-synth"))):
        log = scenario[name]["log"]
        assert log[0].endswith(f"; model {model.path}"), log[0]
        lines = _lines(log, f"series {scenario['scanner_uid']}: 20 instance(s) from ORTHANC")
        assert len(lines) == 1 and "sent to ORTHANC@" in lines[0], log


def test_corrupt_instance_reported_and_node_goes_on(scenario):
    lines = _lines(scenario["node"]["log"], scenario["corrupt_uid"])
    assert len(lines) == 1 and "FAILED" in lines[0] and "cannot decode pixel data" in lines[0], lines
    assert scenario["node"]["failed"] == [scenario["corrupt_uid"]]


def test_clean_shutdown_on_sigterm(scenario):
    for name in ("node", "node-named"):
        assert scenario[name]["rc"] == 0
        assert scenario[name]["log"][-1].endswith("stopped")


def test_scanner_series_fixture_is_complete_and_deterministic(tmp_path):
    """The script's command line (CI's wheel smoke calls it) and the function give the same complete series."""
    import pydicom

    proc = subprocess.run([sys.executable, str(SCANNER_SCRIPT), str(D.real_series_path()), str(tmp_path / "cli")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "20 CT instance(s) written" in proc.stdout, proc.stderr
    again = scanner_series(D.real_series_path(), tmp_path / "again")
    cli = sorted((tmp_path / "cli").iterdir())
    assert [p.name for p in cli] == [p.name for p in again] == [f"CT{k:04d}.dcm" for k in range(1, 21)]
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in cli]
    uids = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    assert [[str(ds.get(u)) for u in uids] for ds in heads] == [
        [str(pydicom.dcmread(p, stop_before_pixels=True).get(u)) for u in uids] for p in again]
    assert len({ds.StudyInstanceUID for ds in heads}) == len({ds.SeriesInstanceUID for ds in heads}) == 1
    assert len({ds.SOPInstanceUID for ds in heads}) == 20 and len({ds.FrameOfReferenceUID for ds in heads}) == 1
    for ds in heads:
        for uid in uids:
            assert pydicom.uid.UID(str(ds.get(uid))).is_valid, (uid, ds.get(uid))
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "CT" and ds.PatientID and ds.PatientName and ds.StudyDate and ds.StudyTime
    assert [int(ds.InstanceNumber) for ds in heads] == list(range(1, 21))
    z = [float(ds.ImagePositionPatient[2]) for ds in heads]
    assert z == sorted(z, reverse=True)  # numbered head to feet
    if shutil.which("dciodvfy") is not None:  # dicom3tools: the standard's rules for a CT image
        for path in (cli[0], cli[-1]):
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
            assert errors == [], errors


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_association_logged_once_accepted_or_rejected(tmp_path, monkeypatch):
    """In process, without dcmtk: a refused caller leaves one line with its AE title, address and the reason;
    an allowed one leaves one line saying it was accepted; a control character in a title cannot split a line."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import Verification

    from qnkit.dicom.node import Destination, Node, NodeConfig

    # pynetdicom checks AE titles on both sides; a peer that is not pynetdicom need not, so let one through
    monkeypatch.setitem(_config.VALIDATORS, "AE", lambda value: (True, ""))
    log: list = []
    node = Node(NodeConfig(workdir=tmp_path, send_to=Destination("DEST", "127.0.0.1", 1), allowed_callers=("PACS",),
                           port=_free_port()), segment=None, log=log.append)
    node.start()
    try:
        outcomes = {}
        for calling in ("EVIL", "PACS", "BAD\nLINE"):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node.config.port, ae_title="QNKIT")
            outcomes[calling] = assoc.is_established
            if assoc.is_established:
                assoc.release()
    finally:
        node.stop()
    assert outcomes == {"EVIL": False, "PACS": True, "BAD\nLINE": False}
    assert len(log) == 3 and all("\n" not in line for line in log), log
    evil, pacs, bad = (_lines(log, f"association from {who} at 127.0.0.1:") for who in ("EVIL", "PACS", "BAD?LINE"))
    assert len(evil) == 1 and evil[0].endswith("(called QNKIT) rejected: calling AE title not recognised "
                                               "(rejected permanent)"), log
    assert len(pacs) == 1 and pacs[0].endswith(" accepted"), log
    assert len(bad) == 1 and "rejected" in bad[0], log


def test_listen_model_resolves_as_segment_does_and_errors_name_qnkit_models(capsys):
    from qnkit.cli import main
    from qnkit.commands.listen import open_model
    from qnkit.models import find_model, resolve_model

    assert open_model(None).path == resolve_model(None) == find_model().path
    assert open_model("kidney-synth").path == find_model("kidney-synth").path
    assert open_model(str(find_model("kidney-synth-2").path)).path == find_model("kidney-synth-2").path
    for wrong in ("no-such-model", "./no/such/bundle"):
        with pytest.raises(SystemExit) as exit_info:
            main(["listen", "--send-to", "PACS@127.0.0.1:4242", "--allow", "PACS", "--model", wrong])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("qnkit: error: ") and "`qnkit models`" in lines[0], lines
        assert wrong.lstrip("./") in lines[0]


def test_received_uids_never_become_paths():
    from qnkit.dicom.node import safe_name

    assert safe_name("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    for evil in ("../../etc/passwd", "/abs", "1.2/3", "", "1." * 40, "a\x00b"):
        name = safe_name(evil)
        assert name.startswith("x") and name.isalnum() and len(name) == 41


def _storage_scp(received: list):
    """A pynetdicom C-STORE SCP on 127.0.0.1 (any free port) that keeps what it receives."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import RTStructureSetStorage, SegmentationStorage

    ae = AE(ae_title="DEST")
    ae.add_supported_context(SegmentationStorage)
    ae.add_supported_context(RTStructureSetStorage)

    def store(event):
        received.append(event.dataset)
        return 0x0000

    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])


def test_restart_resumes_and_delivers(exported_bundle, tmp_path):
    import socket

    from qnkit.batch import segment_many
    from qnkit.bundle import load_bundle
    from qnkit.dicom.node import Destination, Node, NodeConfig
    from qnkit.segment import CaseInput, SegmentOptions

    bundle = load_bundle(exported_bundle)
    predict = D.hu_predictor(30, 200, bundle.hu_window)

    calls = []

    def segment(folder, outputs):
        calls.append(folder)
        case = CaseInput(folder.name, folder, folder)
        segment_many([case], bundle, SegmentOptions(), outputs={case.name: outputs}, predict=predict,
                     stop_on_error=True)
        return "segmented"

    work = tmp_path / "work"
    D.referable_series(work / "incoming" / D.SERIES_UID, decompress=True, every=2)  # received before a restart
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    log: list = []
    config = NodeConfig(workdir=work, send_to=Destination("DEST", "127.0.0.1", dead), allowed_callers=("PACS",),
                        quiet_seconds=0, formats=("seg", "rtstruct"))
    node = Node(config, segment, log=log.append)
    assert node.due() == [D.SERIES_UID]
    node.process(D.SERIES_UID)
    assert "NOT sent" in log[-1] and len(log) == 1
    assert sorted(p.name for p in (work / "outgoing" / D.SERIES_UID).iterdir()) == [".complete", "rtstruct.dcm",
                                                                                     "seg.dcm"]
    assert len(list((work / "incoming" / D.SERIES_UID).iterdir())) == 10  # kept until delivered

    received: list = []
    server = _storage_scp(received)
    try:
        config.send_to = Destination("DEST", "127.0.0.1", server.server_address[1])
        node = Node(config, segment, log=log.append)  # the restart: the results are there, only sending is left
        assert node.due() == []
        node.retry_unsent()
    finally:
        server.shutdown()
    assert "results sent to DEST@127.0.0.1" in log[-1] and len(calls) == 1
    assert sorted(ds.Modality for ds in received) == ["RTSTRUCT", "SEG"]
    assert all(ds.StudyInstanceUID == D.STUDY_UID for ds in received)
    assert list((work / "incoming").iterdir()) == [] and list((work / "outgoing").iterdir()) == []
