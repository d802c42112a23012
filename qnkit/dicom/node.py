"""`qnkit listen`: a DICOM node (C-STORE SCP) that segments the CT series a PACS sends it.

Incoming CT instances are written as they arrive to ``WORKDIR/incoming/<series>/<instance>.dcm`` (folder
and file names are the UIDs when they are plain dotted digits, else a hash of them: nothing received
ever becomes a path as is). A series is segmented once no instance of it has arrived for the quiet
period, through :func:`qnkit.batch.segment_many`; its SEG (and RTSTRUCT) go to
``WORKDIR/outgoing/<series>/`` and are sent by C-STORE to the destination. Only after the destination
has accepted every file are the series' files removed, so a restart resumes: results left complete in
``outgoing`` are sent again, series left in ``incoming`` without them are segmented again. A series that cannot be
segmented is moved to ``WORKDIR/failed/<series>/`` with a ``reason.txt``, and the node goes on. Each
series gets one log line. Associations are accepted only from the configured calling AE titles; every
association request gets one log line too, accepted or rejected (calling AE title, peer address, and
for a rejection the reason sent back), so that an administrator can see who tried.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qnkit.errors import QnkitInputError

__all__ = ["Destination", "NodeConfig", "Node", "parse_destination", "printable", "safe_name"]

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_AE = re.compile(r"[\x20-\x7e]{1,16}")
RETRY_SECONDS = 30.0
COMPLETE = ".complete"  # marks an outgoing folder whose results are all written


def safe_name(value: str) -> str:
    """A file name for a received UID: the UID when it is plain dotted digits (≤ 64), else a hash."""
    value = str(value or "").strip()
    if _UID.fullmatch(value) and len(value) <= 64:
        return value
    return "x" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:40]


def printable(text) -> str:
    """``text`` as one log-safe line: anything outside printable ASCII (a newline in a received AE title)
    becomes ``?``, so that a peer cannot forge or split log lines."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(text)).strip() or "(empty)"


def check_ae_title(title: str, what: str) -> str:
    title = str(title).strip()
    if not _AE.fullmatch(title) or "\\" in title:
        raise QnkitInputError(f"{what} {title!r}: an AE title is 1-16 printable ASCII characters, no backslash")
    return title


@dataclass(frozen=True)
class Destination:
    """Where results are sent: AE title, host and port of a C-STORE SCP (a PACS, a planning system)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """``AE@HOST:PORT`` -> :class:`Destination`; bad text raises QnkitInputError."""
    match = re.fullmatch(r"([^@]{1,16})@([^:@]+):([0-9]{1,5})", str(text).strip())
    if not match or not 0 < int(match.group(3)) < 65536:
        raise QnkitInputError(f"--send-to {text!r}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    return Destination(check_ae_title(match.group(1), "--send-to AE title"), match.group(2), int(match.group(3)))


@dataclass
class NodeConfig:
    """What the node listens on, whom it accepts, where it sends, and how it segments."""

    workdir: Path
    send_to: Destination
    allowed_callers: tuple
    ae_title: str = "QNKIT"
    bind: str = "127.0.0.1"
    port: int = 11112
    quiet_seconds: float = 10.0
    formats: tuple = ("seg",)
    retry_seconds: float = RETRY_SECONDS
    model: str = ""  # the model bundle segmenting, as the start-up log line names it


@dataclass
class _Pending:
    last_arrival: float
    callers: set = field(default_factory=set)
    instances: int = 0


class Node:
    """The SCP and its work loop. ``segment(folder, outputs)`` segments one received series folder
    and writes the files named in ``outputs`` (a :class:`qnkit.batch.CaseOutputs`); it returns a short
    result text for the log line and raises on failure."""

    def __init__(self, config: NodeConfig, segment: Callable, *, log: Callable[[str], None] = print):
        for sub in ("incoming", "outgoing", "failed"):
            (Path(config.workdir) / sub).mkdir(parents=True, exist_ok=True)
        self.config = config
        self.segment = segment
        self._write_log = log
        self._log_lock = threading.Lock()  # association threads and the work loop log at the same time
        self.incoming = Path(config.workdir) / "incoming"
        self.outgoing = Path(config.workdir) / "outgoing"
        self.failed = Path(config.workdir) / "failed"
        self.pending: dict[str, _Pending] = {}
        self.unsent: dict[str, float] = {}  # series -> time of the next send attempt
        self.done_files: dict[str, list] = {}  # series -> received files its results were made from
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = None
        now = time.monotonic()
        for folder in sorted(p for p in self.incoming.iterdir() if p.is_dir()):  # resume after a restart
            if (self.outgoing / folder.name / COMPLETE).is_file():  # segmented, not yet delivered: send again
                self.unsent[folder.name] = now
                self.done_files[folder.name] = sorted(folder.glob("*.dcm"))
            else:  # received (maybe in part): segment once quiet
                self.pending[folder.name] = _Pending(now, {"(before restart)"}, sum(1 for _ in folder.glob("*.dcm")))
        for folder in sorted(p for p in self.outgoing.iterdir() if p.is_dir()):
            if folder.name not in self.pending and (folder / COMPLETE).is_file():
                self.unsent.setdefault(folder.name, now)

    def log(self, line: str) -> None:
        """Hand one line to the log callback, one caller at a time (whole lines, never interleaved)."""
        with self._log_lock:
            self._write_log(line)

    # --- receiving ---------------------------------------------------------------------------

    @staticmethod
    def _peer(event) -> str:
        """``CALLING at HOST:PORT``: who asked for an association (its AE title and address), for the log."""
        requestor = event.assoc.requestor
        return f"{printable(requestor.ae_title)} at {printable(requestor.address)}:{requestor.port}"

    def _on_accepted(self, event) -> None:
        """One log line for an association this node accepted."""
        self.log(f"association from {self._peer(event)} accepted")

    def _on_rejected(self, event) -> None:
        """One log line for an association this node rejected, with the reason it sent back."""
        answer = event.assoc.acceptor.primitive  # the A-ASSOCIATE-RJ just sent
        try:
            reason = answer.reason_str  # e.g. "Calling AE title not recognised"
            why = f"{reason[:1].lower()}{reason[1:]} ({answer.result_str.lower()})"
        except (AttributeError, KeyError, TypeError):
            why = "no reason recorded"
        called = printable(getattr(event.assoc.requestor.primitive, "called_ae_title", "") or "")
        self.log(f"association from {self._peer(event)} (called {called}) rejected: {why}")

    def _on_store(self, event) -> int:
        """Write one received instance under incoming/<series>/ (atomically); 0x0000 = success."""
        try:
            ds = event.dataset
            modality = str(getattr(ds, "Modality", "") or "").upper()
            if modality != "CT":
                return 0x0000  # acknowledged and dropped: only CT series are segmented
            series = safe_name(getattr(ds, "SeriesInstanceUID", ""))
            instance = safe_name(getattr(ds, "SOPInstanceUID", ""))
            folder = self.incoming / series
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{instance}.part"
            tmp.write_bytes(event.encoded_dataset())
            os.replace(tmp, folder / f"{instance}.dcm")
        except Exception as exc:  # noqa: BLE001 - a bad instance is refused, the node goes on
            self.log(f"instance refused: {type(exc).__name__}: {' '.join(str(exc).split())}")
            return 0xC210  # cannot understand
        with self.lock:
            entry = self.pending.setdefault(series, _Pending(time.monotonic()))
            entry.last_arrival = time.monotonic()
            entry.callers.add(printable(event.assoc.requestor.ae_title))
            entry.instances += 1
        return 0x0000

    def start(self) -> None:
        """Start the SCP in a background thread (bound to ``config.bind``)."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allowed_callers)
        for context in AllStoragePresentationContexts:  # any transfer syntax: compressed CT is stored as sent
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
        try:
            self.server = ae.start_server((self.config.bind, self.config.port), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                        (evt.EVT_ACCEPTED, self._on_accepted),
                                                        (evt.EVT_REJECTED, self._on_rejected)])
        except OSError as exc:
            raise QnkitInputError(f"cannot listen on {self.config.bind}:{self.config.port}: "
                                  f"{exc.strerror or exc}") from None

    def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # --- working -----------------------------------------------------------------------------

    def due(self) -> list[str]:
        """Series quiet for the quiet period (oldest first)."""
        now = time.monotonic()
        with self.lock:
            ready = [(p.last_arrival, s) for s, p in self.pending.items()
                     if now - p.last_arrival >= self.config.quiet_seconds]
        return [s for _, s in sorted(ready)]

    def process(self, series: str) -> None:
        """Segment one quiet series, then send its results; one log line whatever happens."""
        from qnkit.batch import CaseOutputs

        with self.lock:
            entry = self.pending.pop(series)
        t = time.perf_counter()
        folder = self.incoming / series
        received = sorted(folder.glob("*.dcm"))  # what this run segments; later arrivals stay for the next
        out = self.outgoing / series
        callers = ",".join(sorted(entry.callers)) or "?"
        head = f"series {series}: {entry.instances} instance(s) from {callers}"
        try:
            if out.exists():
                shutil.rmtree(out)
            out.mkdir()
            outputs = CaseOutputs(seg=out / "seg.dcm" if "seg" in self.config.formats else None,
                                  rtstruct=out / "rtstruct.dcm" if "rtstruct" in self.config.formats else None)
            summary = self.segment(folder, outputs)
            (out / COMPLETE).touch()  # every result is written: a restart sends them instead of redoing them
        except Exception as exc:  # noqa: BLE001 - one series fails, the node goes on
            why = " ".join(str(exc).split()) if isinstance(exc, QnkitInputError) else f"{type(exc).__name__}: {exc}"
            self._set_aside(series, why)
            self.log(f"{head}: FAILED: {why} (kept in {self.failed / series})")
            return
        self.done_files[series] = received
        sent = self._send(series)
        took = time.perf_counter() - t
        self.log(f"{head}: {summary}; " + (f"sent to {self.config.send_to}" if sent is None else
                                          f"NOT sent ({sent}; kept, retrying)") + f" in {took:.1f} s")

    def _set_aside(self, series: str, why: str) -> None:
        target = self.failed / series
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(self.incoming / series), str(target))
        (target / "reason.txt").write_text(why + "\n", encoding="utf-8")
        shutil.rmtree(self.outgoing / series, ignore_errors=True)

    def _send(self, series: str) -> str | None:
        """C-STORE every result file of a series; on success remove its files. Returns None or why not."""
        from pynetdicom import AE
        from pynetdicom.sop_class import RTStructureSetStorage, SegmentationStorage

        files = sorted((self.outgoing / series).glob("*.dcm"))
        dest = self.config.send_to
        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(SegmentationStorage)
        ae.add_requested_context(RTStructureSetStorage)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
        why = None
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            why = f"association with {dest} refused or unreachable"
        else:
            try:
                for file in files:
                    status = assoc.send_c_store(file)
                    code = getattr(status, "Status", None)
                    if code is None or int(code) not in (0x0000, 0xB000, 0xB007, 0xB006):
                        why = f"{dest} answered status {code if code is None else hex(int(code))} for {file.name}"
                        break
            finally:
                assoc.release()
        if why is None:
            shutil.rmtree(self.outgoing / series, ignore_errors=True)
            for file in self.done_files.pop(series, None) or sorted((self.incoming / series).glob("*.dcm")):
                file.unlink(missing_ok=True)
            with self.lock:
                if series not in self.pending:
                    shutil.rmtree(self.incoming / series, ignore_errors=True)
            self.unsent.pop(series, None)
        else:
            self.unsent[series] = time.monotonic() + self.config.retry_seconds
        return why

    def retry_unsent(self) -> None:
        now = time.monotonic()
        for series, when in sorted(self.unsent.items()):
            if when <= now and not self.stopping.is_set():
                why = self._send(series)
                self.log(f"series {series}: " + ("results sent to " + str(self.config.send_to) if why is None
                                                 else f"NOT sent ({why}; kept, retrying)"))

    def serve(self, poll_seconds: float = 0.5) -> None:
        """Run until :meth:`stop` (or a signal handler calling it): segment quiet series, retry sends."""
        self.start()
        self.log(f"listening as {self.config.ae_title} on {self.config.bind}:{self.config.port}; accepting "
                 f"{', '.join(self.config.allowed_callers)}; results to {self.config.send_to}; "
                 f"quiet period {self.config.quiet_seconds:g} s; work folder {self.config.workdir}"
                 + (f"; model {self.config.model}" if self.config.model else ""))
        try:
            while not self.stopping.wait(poll_seconds):
                for series in self.due():
                    if self.stopping.is_set():
                        break
                    self.process(series)
                self.retry_unsent()
        finally:
            self.stop()
            self.log("stopped")
