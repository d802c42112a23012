"""`qnkit listen`: a DICOM node that segments the CT series a PACS sends it and sends back a SEG."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def command(
    send_to: str = typer.Option(..., "--send-to", metavar="AE@HOST:PORT",
                                help="Where results go by C-STORE (a PACS or planning system)."),
    allow: List[str] = typer.Option(..., "--allow", metavar="AE",
                                    help="Calling AE title accepted (repeat for several); others are rejected."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="BUNDLE|NAME",
                                        help="Model bundle folder written by `qnkit export`, or the name of a "
                                             "shipped model (`qnkit models`); default: the shipped model."),
    ae_title: str = typer.Option("QNKIT", "--ae-title", help="This node's AE title."),
    port: int = typer.Option(11112, "--port", min=1, max=65535, help="TCP port to listen on."),
    bind: str = typer.Option("127.0.0.1", "--bind", help="Address to listen on (0.0.0.0: every interface)."),
    workdir: Path = typer.Option(Path("qnkit-node"), "--workdir",
                                 help="Received series, results not yet delivered, failed series (a restart resumes)."),
    quiet: float = typer.Option(10.0, "--quiet-seconds", min=0.0,
                                help="Segment a series once nothing of it has arrived for this long."),
    formats: str = typer.Option("seg", "--format", metavar="LIST", help="seg, rtstruct or seg,rtstruct."),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | onnxruntime | tensorrt."),
    log_file: Optional[Path] = typer.Option(None, "--log", help="Also append the log lines to this file."),
) -> None:
    """Receive CT series by C-STORE, segment each once it is complete, send the SEG (and RTSTRUCT) on.

    One log line per series and one per association, accepted or rejected (on stderr, and in the --log
    file). SIGINT or SIGTERM stops it cleanly after the series in hand.
    """
    import signal
    import sys
    import time

    from qnkit.batch import segment_many
    from qnkit.dicom import require
    from qnkit.dicom.node import Node, NodeConfig, check_ae_title, parse_destination
    from qnkit.errors import QnkitInputError
    from qnkit.report import describe_sides
    from qnkit.segment import CaseInput, SegmentOptions

    require("pynetdicom")
    require("highdicom")
    destination = parse_destination(send_to)
    callers = tuple(dict.fromkeys(check_ae_title(a, "--allow") for a in allow))
    chosen = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
    if not chosen or set(chosen) - {"seg", "rtstruct"}:
        raise QnkitInputError(f"--format {formats!r}: choose seg, rtstruct or seg,rtstruct")
    from qnkit.backends import open_backend

    bundle = open_model(model)
    opened = []
    try:
        sink = open(log_file, "a", encoding="utf-8") if log_file is not None else None
    except OSError as exc:
        raise QnkitInputError(f"--log {log_file}: cannot open it for writing ({exc.strerror or exc})") from None

    def log(line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        print(stamped, file=sys.stderr, flush=True)
        if sink is not None:
            sink.write(stamped + "\n")
            sink.flush()

    def predict(x):
        if not opened:
            opened.append(open_backend(bundle, backend, log=lambda m: node.log(m)))  # node.log: one writer at a time
        return opened[0].predict(x)

    def segment(folder: Path, outputs) -> str:
        case = CaseInput(folder.name, folder, folder)
        done = segment_many([case], bundle, SegmentOptions(), outputs={case.name: outputs}, predict=predict,
                            stop_on_error=True)
        return describe_sides(done.results[0].stats)

    node = Node(NodeConfig(workdir=workdir, send_to=destination, allowed_callers=callers,
                           ae_title=check_ae_title(ae_title, "--ae-title"), bind=bind, port=port,
                           quiet_seconds=quiet, formats=chosen, model=str(bundle.path)), segment, log=log)

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        node.stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        node.serve()
    finally:
        for engine in opened:
            engine.close()
        if sink is not None:
            sink.close()


def open_model(model: Optional[str]):
    """The verified bundle for ``--model``: a bundle folder, a shipped model's name, or (None) the default
    shipped model, resolved exactly as `qnkit segment` resolves it. A model that cannot be found or used
    ends with an error that names `qnkit models`, where the shipped models are listed."""
    from qnkit.bundle import load_bundle
    from qnkit.errors import QnkitInputError
    from qnkit.models import resolve_model

    try:
        return load_bundle(resolve_model(model), verify=True)
    except QnkitInputError as exc:  # the message names the folder or the name already
        raise QnkitInputError(f"{exc}; `qnkit models` lists the shipped models") from None
