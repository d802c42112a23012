"""Segment many cases on a Ray cluster: the cluster runner behind ``qnkit segment ... --ray [ADDRESS]``.

A thin caller of the library loop (:func:`qnkit.batch.segment_many`): each Ray worker is an actor
that receives the bundle once through Ray's object store, writes it to a node-local cache folder,
verifies it there (:func:`qnkit.bundle.load_bundle`: the manifest hash and every artefact's SHA-256,
and the manifest must be the one the driver loaded) and opens its backend once, chosen on its own
node by :func:`qnkit.backends.open_backend` ("auto": TensorRT or ONNX Runtime GPU where the node has
a GPU, ONNX Runtime on the CPU elsewhere). The driver hands one case at a time to each idle worker
and collects results as they finish (``ray.wait``); the worker segments it with ``segment_many`` on
one case, so outputs and records are written by exactly the code of the local run (crash-safe, all
of a case's outputs or none).

Failure isolation: a case that fails is reported and the others go on. A worker that dies while
segmenting (killed, out of memory) is restarted by Ray (``max_restarts``) and its case is handed to
the next idle worker, at most ``retries`` more times; a partial output cannot exist (every output is
written to a temporary name and renamed into place). Inputs and outputs must be on a filesystem that
every node sees under the same paths (the driver sends absolute paths).

Ray is imported only here, and only when a cluster run starts (``pip install "qnkit[cluster]"``).
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from qnkit import batch as B
from qnkit.errors import QnkitInputError

__all__ = ["ClusterOptions", "ClusterRun", "WorkerLost", "segment_on_ray", "import_ray"]

LOCAL_ADDRESSES = (None, "", "auto", "local")


class WorkerLost(RuntimeError):
    """A case whose worker died more times than the retries allow (killed, out of memory)."""


@dataclass
class ClusterOptions:
    """How to run on Ray: where, how many workers, what each reserves, how often a lost case is retried."""

    address: str | None = "auto"  # auto/local/None: start a local Ray instance; else join this cluster
    workers: int | None = None  # default: cluster CPUs / cpus_per_worker (GPUs / gpus_per_worker with GPUs)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    retries: int = 2  # times a case is handed to another worker after its worker died
    backend: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 16
    threads: int | None = None  # per worker; default: its CPUs


@dataclass
class ClusterRun:
    """What :func:`segment_on_ray` did: the batch result and each worker's description."""

    done: B.BatchResult
    workers: list  # {"host", "pid", "backend": backend.describe(), "bundle"} per worker that opened
    retried: int = 0  # cases handed to another worker after their worker died


def import_ray():
    try:
        import ray
    except ImportError:
        raise QnkitInputError('--ray needs Ray: pip install "qnkit[cluster]"') from None
    return ray


# --- the worker ------------------------------------------------------------------------------


def _materialize_bundle(files: dict, manifest: str):
    """The shipped bundle written once per node under the qnkit cache folder, loaded and verified."""
    import tempfile

    from qnkit._atomic import discard_temp
    from qnkit.backends.onnxruntime_backend import cache_dir
    from qnkit.bundle import MANIFEST_KEY, METADATA_NAME, BundleError, load_bundle

    def verified(folder: Path):
        bundle = load_bundle(folder, verify=True)
        if bundle.metadata.get(MANIFEST_KEY) != manifest:
            raise BundleError(f"{folder}: not the bundle the driver loaded (manifest differs)")
        return bundle

    try:
        root = cache_dir() / "bundles"
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / f"qnkit-bundles-{os.getuid()}"
        root.mkdir(parents=True, exist_ok=True)
    target = root / manifest[:32]
    if target.is_dir():
        try:
            return verified(target)
        except BundleError:
            discard_temp(target)  # damaged cache: write it again
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    if METADATA_NAME not in files:
        raise BundleError(f"the shipped bundle has no {METADATA_NAME}")
    try:
        os.rename(tmp, target)
    except OSError:  # another worker on this node was first
        discard_temp(tmp)
    return verified(target)


class SegmentWorker:
    """One Ray actor: the bundle and its backend, opened once (:meth:`open`); segments one case per call.

    The bundle comes through :meth:`open`, not the constructor: Ray re-runs only the constructor when
    it restarts a dead worker (and warns about constructor arguments held in the object store), so the
    driver calls :meth:`open` again on the restarted worker, which makes it whole.
    """

    def __init__(self, manifest: str, backend: str, precision: str, device: str, batch_size: int,
                 threads: int | None):
        self.where = {"host": socket.gethostname(), "pid": os.getpid()}
        self.settings = (manifest, backend, precision, device, batch_size, threads)
        self.log: list[str] = []
        self.error = None
        self.engine = None
        self.bundle = None

    def open(self, holder: list) -> dict:
        """Fetch the bundle (``holder``: [its ObjectRef]), verify it on this node and open the backend,
        once; returns :meth:`describe` (its ``error`` says why this worker cannot segment)."""
        if self.engine is not None or self.error is not None:
            return self.describe()
        manifest, backend, precision, device, batch_size, threads = self.settings
        try:
            import ray

            if threads:
                from qnkit import kernels

                kernels.set_num_threads(threads)
            self.bundle = _materialize_bundle(ray.get(holder[0]), manifest)
            from qnkit.backends import open_backend

            extra = {"threads": threads} if threads else {}
            self.engine = open_backend(self.bundle, backend, precision=precision, device=device,
                                       batch_size=batch_size, log=self.log.append, **extra)
        except Exception as exc:  # noqa: BLE001 - reported by the driver, which drops this worker
            self.error = " ".join(str(exc).split()) if isinstance(exc, QnkitInputError) else \
                f"{type(exc).__name__}: {exc}"
        return self.describe()

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        backend = self.engine.describe() if self.engine is not None else None
        return {**self.where, "pid": os.getpid(), "error": self.error, "log": list(self.log),
                "backend": backend, "bundle": str(self.bundle.path) if self.engine is not None else None}

    def segment(self, case, target, options, series, overwrite: bool) -> dict:
        messages: list[str] = []
        err = io.StringIO()
        extra = {"worker": {**self.where, "backend": self.engine.describe()}}
        with contextlib.redirect_stderr(err):
            done = B.segment_many([case], self.bundle, options, outputs={case.name: target},
                                  predict=self.engine.predict, series=series, overwrite=overwrite,
                                  log=messages.append, record_extra=extra)
        lines = [line for line in err.getvalue().splitlines() if line.strip()] + messages
        failure = None
        if done.failures:
            exc = done.failures[0][1]
            failure = ("input" if isinstance(exc, QnkitInputError) else "error",
                       " ".join(str(exc).split()) if isinstance(exc, QnkitInputError)
                       else f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        return {"result": done.results[0] if done.results else None, "failure": failure, "messages": lines,
                "worker": self.where, "missing": done.missing}


# --- the driver ------------------------------------------------------------------------------


def _absolute(case, target):
    """The case and its outputs with absolute paths (workers do not share the driver's folder)."""
    case = replace(case, image=Path(case.image).absolute(), source=Path(case.source).absolute())
    target = B.CaseOutputs(**{k: (Path(v).absolute() if v is not None else None)
                              for k, v in vars(target).items()})
    return case, target


def _bundle_files(bundle) -> dict:
    """The bundle's files as verified bytes (what the object store ships to every worker)."""
    from qnkit.bundle import METADATA_NAME

    files = {name: bundle.read(name) for name in sorted(bundle.metadata.get("artefacts", {}))}
    files[METADATA_NAME] = (Path(bundle.path) / METADATA_NAME).read_bytes()
    return files


def _probe(address: str) -> None:
    """A one-line error now for a ``host:port`` (or ``ray://host:port``) where nothing listens, instead
    of Ray's minutes of reconnecting."""
    import re

    m = re.fullmatch(r"(?:[a-z]+://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if m is None:
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=10).close()
    except OSError as exc:
        raise QnkitInputError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                              f"with `ray start --head` or check the head's address") from None


def _start(ray, address, num_cpus: float | None) -> bool:
    """Join ``address`` or start a local instance; True when this call started (and must stop) Ray."""
    if ray.is_initialized():
        return False
    if address not in LOCAL_ADDRESSES:
        _probe(address)
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address in LOCAL_ADDRESSES:
            ray.init(address="local", num_cpus=num_cpus, **common)
        else:
            ray.init(address=address, **{k: v for k, v in common.items() if k != "include_dashboard"})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise QnkitInputError(f"--ray {address}: cannot start or join Ray ({' '.join(str(exc).split())})") from None
    return True


def _plan_workers(ray, opts: ClusterOptions) -> tuple[int, float, float]:
    """(workers, CPUs, GPUs per worker) checked against what the cluster has."""
    total = ray.cluster_resources()
    cpus, gpus_total = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    gpus = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if gpus_total >= 1 else 0.0)
    if gpus > gpus_total:
        raise QnkitInputError(f"--ray-gpus-per-worker {gpus:g}: the Ray cluster has {gpus_total:g} GPU(s)")
    if opts.cpus_per_worker > cpus:
        raise QnkitInputError(f"--ray-cpus-per-worker {opts.cpus_per_worker:g}: the Ray cluster has {cpus:g} CPU(s)")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if nodes and not any(n.get("CPU", 0) >= opts.cpus_per_worker and n.get("GPU", 0) >= gpus for n in nodes):
        raise QnkitInputError(f"no node of the Ray cluster has {opts.cpus_per_worker:g} CPU(s)"
                              + (f" and {gpus:g} GPU(s)" if gpus else "") + " for one worker")
    if opts.workers:
        return int(opts.workers), opts.cpus_per_worker, gpus
    by_cpu = int(cpus // opts.cpus_per_worker) if opts.cpus_per_worker > 0 else 1
    by_gpu = int(gpus_total // gpus) if gpus > 0 else by_cpu
    return max(1, min(by_cpu, by_gpu)), opts.cpus_per_worker, gpus


def segment_on_ray(cases, bundle, options=None, *, outputs: dict | None = None, cluster: ClusterOptions | None = None,
                   series: str | None = None, overwrite: bool = False, progress: bool = False, console=None,
                   log: Callable[[str], None] | None = None) -> ClusterRun:
    """Segment ``cases`` on Ray workers and write their ``outputs`` (as :func:`qnkit.batch.segment_many`).

    Returns a :class:`ClusterRun`: results in the order of ``cases``, failures (a case that failed, or
    whose worker died more than ``cluster.retries`` times: :class:`WorkerLost`), and the workers. When
    Ray is already initialised (``ray.init`` by the caller) it is used as it is and left running; else
    this starts or joins ``cluster.address`` and shuts Ray down at the end. No worker able to open the
    bundle raises QnkitInputError.
    """
    from qnkit import segment as S
    from qnkit.bundle import MANIFEST_KEY

    ray = import_ray()
    from ray.exceptions import RayError, RayTaskError

    options = options or S.SegmentOptions()
    cluster = cluster or ClusterOptions()
    outputs = outputs or {}
    say = log or ((lambda m: console.print(m, markup=False)) if console is not None else (lambda m: None))
    done = B.BatchResult()
    run = ClusterRun(done=done, workers=[])
    if not cases:
        return run
    wanted = None
    if cluster.address in LOCAL_ADDRESSES and cluster.workers:
        from qnkit.cpus import available_cpus

        wanted = max(float(available_cpus()), cluster.workers * cluster.cpus_per_worker)
    started = _start(ray, cluster.address, wanted)
    actors: list = []
    try:
        count, cpus, gpus = _plan_workers(ray, cluster)
        threads = cluster.threads or max(1, int(cpus))
        files = ray.put(_bundle_files(bundle))
        manifest = bundle.metadata.get(MANIFEST_KEY)
        worker_cls = ray.remote(SegmentWorker).options(num_cpus=cpus, num_gpus=gpus,
                                                       max_restarts=max(0, cluster.retries), max_task_retries=0)
        actors = [worker_cls.remote(manifest, cluster.backend, cluster.precision, cluster.device,
                                    cluster.batch_size, threads) for _ in range(count)]
        original = {c.name: (c, outputs.get(c.name) or B.CaseOutputs()) for c in cases}
        queue = deque(c.name for c in cases)
        attempts = {c.name: 0 for c in cases}
        pending: dict = {a.open.remote([files]): ("ready", a, None) for a in actors}
        idle: list = []
        refused: list[str] = []
        results: dict = {}
        seen: dict = {}  # actor index -> its description (the latest, after a restart)
        bar = B.progress_bar(console, progress)
        with bar:
            task = bar.add_task(f"cases ({count} Ray worker{'s' if count != 1 else ''})", total=len(cases))
            while queue or any(kind == "case" for kind, _, _ in pending.values()):
                while idle and queue:
                    actor, name = idle.pop(), queue.popleft()
                    attempts[name] += 1
                    case, target = _absolute(*original[name])
                    ref = actor.segment.remote(case, target, options, series, overwrite or attempts[name] > 1)
                    pending[ref] = ("case", actor, name)
                if not pending:
                    break  # no worker left
                ready, _ = ray.wait(list(pending), num_returns=1)
                kind, actor, name = pending.pop(ready[0])
                try:
                    value = ray.get(ready[0])
                except RayTaskError as exc:  # an error in the worker's code itself: the case fails, no retry
                    value = {"result": None, "failure": ("error", " ".join(str(exc).split()[-40:])),
                             "messages": [], "worker": None}
                    if kind == "ready":
                        refused.append(value["failure"][1])
                        continue
                except RayError as exc:  # the worker died (killed, out of memory, node lost)
                    if kind == "ready":
                        continue  # restarts used up: this worker is gone
                    why = " ".join(str(exc).split())[:300]
                    if attempts[name] <= cluster.retries:
                        run.retried += 1
                        say(f"qnkit: {name}: its worker died ({type(exc).__name__}); retrying on another worker "
                            f"(attempt {attempts[name] + 1} of {cluster.retries + 1})")
                        queue.appendleft(name)
                    else:
                        done.failures.append((original[name][0], WorkerLost(
                            f"its worker died {attempts[name]} time(s) ({why})")))
                        say(f"qnkit: {name} failed: its worker died {attempts[name]} time(s); not retried again")
                        bar.advance(task)
                    pending[actor.open.remote([files])] = ("ready", actor, None)  # when Ray has restarted it
                    continue
                if kind == "ready":
                    if value.get("error"):
                        refused.append(f"{value['host']} pid {value['pid']}: {value['error']}")
                        ray.kill(actor, no_restart=True)
                    else:
                        seen[actors.index(actor)] = value  # a restarted worker replaces its earlier self
                        idle.append(actor)
                    continue
                for line in value["messages"]:
                    say(line)
                case, target = original[name]
                if value["failure"] is not None:
                    cls = QnkitInputError if value["failure"][0] == "input" else RuntimeError
                    done.failures.append((case, cls(value["failure"][1])))
                else:
                    result = value["result"]
                    result.input, result.output = case.image, target.nifti  # the paths the user gave
                    results[name] = result
                    if value.get("missing"):  # an optional output (preview) failed; the masks were written
                        done.missing.extend(value["missing"])
                        target = replace(target, preview=None)
                    done.outputs[name] = target
                idle.append(actor)
                bar.advance(task)
        run.workers = [seen[i] for i in sorted(seen)]
        if not run.workers and refused:
            raise QnkitInputError(f"no Ray worker could open the model: {refused[0]}")
        left = [name for name in queue]
        for name in left:
            done.failures.append((original[name][0], WorkerLost("no Ray worker left to segment it")))
            say(f"qnkit: {name} failed: no Ray worker left to segment it")
        done.results = [results[c.name] for c in cases if c.name in results]
        order = {c.name: i for i, c in enumerate(cases)}
        done.failures.sort(key=lambda f: order[f[0].name])
        return run
    finally:
        if started:
            ray.shutdown()
        else:
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
