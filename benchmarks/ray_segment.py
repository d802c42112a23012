"""Cases per minute of `qnkit segment` locally and on 1..N local Ray workers, measured in one run.

    python benchmarks/ray_segment.py [--model NAME|BUNDLE] [--cases 6] [--size 64] [--workers 1,2] [--json FILE]

The same synthetic cases (qnkit synth, KiTS19 layout) and the same model go through:
- ``local``: :func:`qnkit.batch.segment_many` with the backend opened once (what `qnkit segment` runs),
  its threads on every core this process may use;
- ``ray N``: :func:`qnkit.cluster.segment_on_ray` with N workers of 1 CPU (1 thread) each on one local
  Ray instance, started once before the timed runs (its start-up is reported on its own); each timed run
  includes creating the workers, shipping and verifying the bundle on them and opening their backends.
Every run writes masks and records into a fresh folder; the masks are compared with the local run's.
Ray needs the [cluster] extra.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundle folder or shipped model name (default: the shipped model)")
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--size", type=int, default=64, help="in-plane size of the synthetic cases")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to measure, comma-separated")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import ray

    from qnkit import batch as B
    from qnkit import io as qio
    from qnkit.backends import open_backend
    from qnkit.bundle import load_bundle
    from qnkit.cluster import ClusterOptions, segment_on_ray
    from qnkit.cpus import available_cpus
    from qnkit.models import resolve_model
    from qnkit.segment import SegmentOptions
    from qnkit.synth import write_dataset

    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    work = Path(tempfile.mkdtemp(prefix="qnkit-ray-bench-"))
    write_dataset(work / "data", cases=args.cases, size=args.size, seed=11, progress=False)
    bundle = load_bundle(resolve_model(args.model), verify=True)
    cases, batch = B.resolve_cases([work / "data"])
    options = SegmentOptions()
    report = {"cpu": cpu_name(), "cpus": available_cpus(), "model": str(bundle.path), "cases": len(cases),
              "size": args.size, "slices": None, "runs": {}}

    def plan(name):
        return B.plan_outputs(cases, batch, out=work / name, records=True)

    t = time.perf_counter()
    backend = open_backend(bundle, "auto", log=lambda m: None)
    local = B.segment_many(cases, bundle, options, outputs=plan("local"), predict=backend.predict,
                           log=lambda m: None)
    seconds = time.perf_counter() - t
    backend.close()
    report["slices"] = sum(r.slices for r in local.results)
    report["runs"]["local"] = {"seconds": round(seconds, 2), "cases_per_min": round(60 * len(cases) / seconds, 2),
                               "threads": available_cpus(), "backend": backend.describe()["name"]}
    print(f"local: {len(local.results)} cases in {seconds:.1f} s ({60 * len(cases) / seconds:.2f} cases/min)",
          flush=True)

    t = time.perf_counter()
    ray.init(num_cpus=max(max(counts), available_cpus()), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    report["ray_start_s"] = round(time.perf_counter() - t, 2)
    try:
        for n in counts:
            t = time.perf_counter()
            run = segment_on_ray(cases, bundle, options, outputs=plan(f"ray{n}"), log=lambda m: None,
                                 cluster=ClusterOptions(workers=n, cpus_per_worker=1.0))
            seconds = time.perf_counter() - t
            same = all(np.array_equal(qio.load_labels(work / f"ray{n}" / p.name)[0], qio.load_labels(p)[0])
                       for p in sorted((work / "local").glob("*_kidneys.nii.gz")))
            report["runs"][f"ray {n}"] = {"seconds": round(seconds, 2),
                                          "cases_per_min": round(60 * len(cases) / seconds, 2),
                                          "workers": n, "failures": len(run.done.failures),
                                          "masks_equal_local": same}
            print(f"ray {n} worker(s): {len(run.done.results)} cases in {seconds:.1f} s "
                  f"({60 * len(cases) / seconds:.2f} cases/min), masks equal to local: {same}", flush=True)
    finally:
        ray.shutdown()
    print(f"CPU: {report['cpu']} ({report['cpus']} CPUs); Ray start-up {report['ray_start_s']} s (not in the "
          f"figures); {report['cases']} cases of {args.size}x{args.size}, {report['slices']} slices")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
