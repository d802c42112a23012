"""The `qnkit listen` round trip with a real PACS, run by tests/test_dicom_node.py inside a private network
namespace (only a loopback interface exists there, so Orthanc, which binds every interface, and the node
are reachable from 127.0.0.1 only, and nothing else is).

Steps, each bounded in time: start Orthanc (temporary config and storage) and `qnkit listen`; try an
association from an unknown AE title; send a series with a corrupt instance, then a good series, from
an allowed AE title (pynetdicom C-STORE SCU); wait for the SEG and RTSTRUCT of the good series in
Orthanc (REST API) and for the node's log line about the corrupt one; fetch the SEG; stop the node
with SIGTERM and Orthanc. Writes what it saw to a JSON file for the tests to judge.

usage: python dicom_node_scenario.py BUNDLE GOOD_SERIES CORRUPT_SERIES WORKDIR RESULT.json
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, step: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def rest(port: int, path: str, data: bytes | None = None):
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data)
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return body if path.endswith("/file") else json.loads(body)


def start_orthanc(workdir: Path) -> tuple[subprocess.Popen, int, int]:
    http, dicom = free_port(), free_port()
    config = {"Name": "qnkit-test", "StorageDirectory": str(workdir / "orthanc"),
              "IndexDirectory": str(workdir / "orthanc"), "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC",
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
              "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False, "StorageCompression": False}
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "w")
    proc = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT)

    def up():
        try:
            return rest(http, "/system")
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}; see {workdir / 'orthanc.log'}")
            return None

    wait_for(up, 60, "Orthanc")
    return proc, http, dicom


def send_series(folder: Path, port: int, calling: str) -> dict:
    """C-STORE every file of a folder to the node; returns {'established': bool, 'statuses': [...]}."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=calling)
    for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"):  # one context each: uncompressed, JPEG 2000
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate(HOST, port, ae_title="QNKIT")
    if not assoc.is_established:
        return {"established": False, "rejected": bool(assoc.is_rejected), "statuses": []}
    statuses = []
    try:
        for f in sorted(folder.iterdir()):
            status = assoc.send_c_store(pydicom.dcmread(f))
            statuses.append(int(getattr(status, "Status", -1)))
    finally:
        assoc.release()
    return {"established": True, "rejected": False, "statuses": statuses}


def main(bundle: str, good: str, corrupt: str, workdir: str, result_path: str) -> None:
    import pydicom

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    orthanc = node = None
    try:
        orthanc, http, orthanc_dicom = start_orthanc(work)
        node_port = free_port()
        node_log = work / "node.log"
        node = subprocess.Popen(
            [sys.executable, "-m", "qnkit", "listen", "--model", bundle, "--allow", "MODALITY", "--allow", "PACS",
             "--send-to", f"ORTHANC@{HOST}:{orthanc_dicom}", "--port", str(node_port), "--bind", HOST,
             "--workdir", str(work / "node"), "--quiet-seconds", "2", "--format", "seg,rtstruct", "--log",
             str(node_log)], stdout=subprocess.DEVNULL, stderr=open(work / "node.stderr", "w"),
            env={**os.environ, "QNKIT_NUM_THREADS": "1"})

        def listening():
            if node.poll() is not None:
                raise RuntimeError(f"qnkit listen exited with {node.returncode}: "
                                   f"{(work / 'node.stderr').read_text()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex((HOST, node_port)) == 0

        wait_for(listening, 120, "qnkit listen")
        result["intruder"] = send_series(Path(good), node_port, "INTRUDER")
        result["corrupt_sent"] = send_series(Path(corrupt), node_port, "MODALITY")
        result["good_sent"] = send_series(Path(good), node_port, "PACS")
        good_uid = str(pydicom.dcmread(next(Path(good).iterdir()), stop_before_pixels=True).SeriesInstanceUID)
        corrupt_uid = str(pydicom.dcmread(next(Path(corrupt).iterdir()), stop_before_pixels=True).SeriesInstanceUID)

        def derived():
            found = rest(http, "/tools/find", json.dumps({"Level": "Series", "Query": {},
                                                          "Expand": True}).encode())
            kinds = {s["MainDicomTags"].get("Modality"): s for s in found}
            return kinds if {"SEG", "RTSTRUCT"} <= set(kinds) else None

        kinds = wait_for(derived, 400, "the SEG and RTSTRUCT in Orthanc", step=1.0)
        seg_instance = kinds["SEG"]["Instances"][0]
        (work / "seg_from_orthanc.dcm").write_bytes(rest(http, f"/instances/{seg_instance}/file"))
        result["seg_file"] = str(work / "seg_from_orthanc.dcm")
        result["orthanc_modalities"] = sorted(k for k in kinds if k)
        wait_for(lambda: corrupt_uid in node_log.read_text(), 120, "the node's line about the corrupt series")
        result["good_uid"], result["corrupt_uid"] = good_uid, corrupt_uid
        node.send_signal(signal.SIGTERM)
        result["node_rc"] = node.wait(timeout=120)
        result["node_log"] = node_log.read_text().splitlines()
        result["left_in_incoming"] = sorted(p.name for p in (work / "node" / "incoming").iterdir())
        result["failed"] = sorted(p.name for p in (work / "node" / "failed").iterdir())
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for proc in (node, orthanc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:6])
