"""The `qnkit listen` round trip with a real PACS, run by tests/test_dicom_node.py inside a private network
namespace (only a loopback interface exists there, so Orthanc, which binds every interface, and the nodes
are reachable from 127.0.0.1 only, and nothing else is).

Steps, each bounded in time: start Orthanc (temporary config and storage, the two nodes registered as
its modalities ``qnkit`` and ``qnkit-named``) and two `qnkit listen` nodes, one without ``--model`` (the
default shipped model) and one with ``--model kidney-synth``; try an association from an unknown AE title
with dcmtk's ``storescu -aet EVIL``; send a series with a corrupt instance with ``storescu -aet MODALITY``
(allowed); then do what a user does: upload the scanner series to Orthanc (``POST /instances``) and push
its study to each node (``POST /modalities/{name}/store``); wait for each node's SEG (and the first
node's RTSTRUCT) in that study in Orthanc (REST API) and for the first node's log line about the corrupt
series; fetch the SEGs; stop the nodes with SIGTERM and Orthanc. Writes what it saw to a JSON file for
the tests to judge.

usage: python dicom_node_scenario.py SCANNER_SERIES CORRUPT_SERIES WORKDIR RESULT.json
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
    with urllib.request.urlopen(request, timeout=60) as response:  # a synchronous store included
        body = response.read()
    return body if path.endswith("/file") else json.loads(body)


def start_orthanc(workdir: Path, modalities: dict) -> tuple[subprocess.Popen, int, int]:
    """Orthanc with its own storage under ``workdir``; ``modalities``: {name: (AE title, port)} it may
    C-STORE to (`POST /modalities/{name}/store`). Returns the process, its HTTP and its DICOM port."""
    http, dicom = free_port(), free_port()
    config = {"Name": "qnkit-test", "StorageDirectory": str(workdir / "orthanc"),
              "IndexDirectory": str(workdir / "orthanc"), "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC",
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
              "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False, "StorageCompression": False,
              "DicomModalities": {name: [aet, HOST, port] for name, (aet, port) in modalities.items()}}
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


def storescu(files: list[Path], port: int, calling: str) -> dict:
    """dcmtk's ``storescu -aet CALLING`` sending ``files`` to the node: {'rc': exit status, 'output': text}."""
    proc = subprocess.run(["storescu", "-aet", calling, "-aec", "QNKIT", HOST, str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    return {"rc": proc.returncode, "output": proc.stdout + proc.stderr}


def start_node(work: Path, name: str, port: int, orthanc_dicom: int, extra: list[str]) -> subprocess.Popen:
    """`qnkit listen` accepting ORTHANC and MODALITY, sending to Orthanc, logging to ``work/<name>.log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "qnkit", "listen", *extra, "--allow", "ORTHANC", "--allow", "MODALITY",
         "--send-to", f"ORTHANC@{HOST}:{orthanc_dicom}", "--port", str(port), "--bind", HOST,
         "--workdir", str(work / name), "--quiet-seconds", "2", "--log", str(work / f"{name}.log")],
        stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.stderr", "w"),
        env={**os.environ, "QNKIT_NUM_THREADS": "1"})


def wait_listening(node: subprocess.Popen, port: int, stderr: Path) -> None:
    def listening():
        if node.poll() is not None:
            raise RuntimeError(f"qnkit listen exited with {node.returncode}: {stderr.read_text()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex((HOST, port)) == 0

    wait_for(listening, 120, "qnkit listen")


def upload(http: int, files: list[Path]) -> str:
    """POST every file to Orthanc's /instances, as a user uploads a series; returns Orthanc's study ID."""
    studies = {rest(http, "/instances", f.read_bytes())["ParentStudy"] for f in files}
    if len(studies) != 1:
        raise RuntimeError(f"the upload made {len(studies)} studies in Orthanc, expected 1")
    return studies.pop()


def main(scanner: str, corrupt: str, workdir: str, result_path: str) -> None:
    import pydicom

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    orthanc = None
    nodes: dict = {}
    try:
        ports = {"node": free_port(), "node-named": free_port()}
        orthanc, http, orthanc_dicom = start_orthanc(work, {"qnkit": ("QNKIT", ports["node"]),
                                                            "qnkit-named": ("QNKIT", ports["node-named"])})
        nodes["node"] = start_node(work, "node", ports["node"], orthanc_dicom, ["--format", "seg,rtstruct"])
        nodes["node-named"] = start_node(work, "node-named", ports["node-named"], orthanc_dicom,
                                         ["--model", "kidney-synth", "--format", "seg"])
        for name, node in nodes.items():
            wait_listening(node, ports[name], work / f"{name}.stderr")

        scanner_files = sorted(Path(scanner).iterdir())
        corrupt_files = sorted(Path(corrupt).iterdir())
        result["evil"] = storescu(scanner_files[:1], ports["node"], "EVIL")
        result["modality"] = storescu(corrupt_files, ports["node"], "MODALITY")

        first = pydicom.dcmread(scanner_files[0], stop_before_pixels=True)
        result["scanner_uid"], result["study_uid"] = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
        result["corrupt_uid"] = str(pydicom.dcmread(corrupt_files[0], stop_before_pixels=True).SeriesInstanceUID)
        study = upload(http, scanner_files)
        result["uploaded"] = len(rest(http, f"/studies/{study}/instances"))
        request = json.dumps({"Resources": [study], "Synchronous": True}).encode()
        result["stored"] = {name: rest(http, f"/modalities/{name}/store", request)
                            for name in ("qnkit", "qnkit-named")}

        def derived():
            series = rest(http, f"/studies/{study}/series")
            found = [s for s in series if s["MainDicomTags"].get("Modality") in ("SEG", "RTSTRUCT")]
            kinds = sorted(s["MainDicomTags"]["Modality"] for s in found)
            return found if kinds == ["RTSTRUCT", "SEG", "SEG"] else None

        found = wait_for(derived, 400, "two SEGs and an RTSTRUCT in the study in Orthanc", step=1.0)
        result["study_modalities"] = sorted(s["MainDicomTags"].get("Modality")
                                            for s in rest(http, f"/studies/{study}/series"))
        result["seg_files"] = []
        for k, series in enumerate(s for s in found if s["MainDicomTags"]["Modality"] == "SEG"):
            path = work / f"seg_from_orthanc_{k}.dcm"
            path.write_bytes(rest(http, f"/instances/{series['Instances'][0]}/file"))
            result["seg_files"].append(str(path))
        wait_for(lambda: result["corrupt_uid"] in (work / "node.log").read_text(), 120,
                 "the node's line about the corrupt series")
        for name, node in nodes.items():
            node.send_signal(signal.SIGTERM)
        for name, node in nodes.items():
            result[name] = {"rc": node.wait(timeout=120), "log": (work / f"{name}.log").read_text().splitlines(),
                            "stderr": (work / f"{name}.stderr").read_text().splitlines(),
                            "left_in_incoming": sorted(p.name for p in (work / name / "incoming").iterdir()),
                            "failed": sorted(p.name for p in (work / name / "failed").iterdir())}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for proc in (*nodes.values(), orthanc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
