"""`qnkit train` end to end: run folder, splits, cache, model, solver; single process or torchrun.

RUN_DIR after a run:
    settings.ini            effective settings (defaults <- .ini <- command line)
    evaluation_data.json    the test split (never read by training)
    splits.json             train / validation / test / filtered cases (with reasons), preprocessing
    cache/                  preprocessed .npy cache (unless [DATA] cache_dir points elsewhere)
    checkpoints/{best,last} see qnkit.train.checkpoint
    tensorboard/{train,validation,evaluation}
    metrics.jsonl           one JSON line per epoch
A run that fails before its first epoch (bad data, bad settings) removes the folder it created.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from qnkit._atomic import remove_path
from qnkit.cpus import available_cpus, requested_threads
from qnkit.errors import QnkitInputError
from qnkit.train import checkpoint as ckpt
from qnkit.train import data as D
from qnkit.train import distributed as dist
from qnkit.train.augment import Augment
from qnkit.train.dataset import SliceDataset
from qnkit.train.settings import Settings, apply_overrides, load_settings, read_ini
from qnkit.train.solver import (SCHEDULE_KEYS, Solver, count_parameters, describe_step, seed_everything,
                                 slices_per_epoch)
from qnkit.train.tb_logging import Logger

ARTEFACTS = ("settings.ini", "evaluation_data.json", "splits.json", "metrics.jsonl", "checkpoints", "tensorboard",
             "test_dice.json")
RESUME_CHANGEABLE = {("TRAINING", "epochs"), ("COMMON", "device"), ("COMMON", "num_workers"),
                     ("COMMON", "progress"), ("TRAINING", "crop_size"), ("TRAINING", "crop_kidney_p"),
                     ("EVAL", "reference_data"), ("EVAL", "reference_every"), ("TRAINING", "amp"),
                     ("TRAINING", "compile")} | set(SCHEDULE_KEYS)


def resolve_device(name: str, info: dist.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise QnkitInputError("device cuda requested but no CUDA device is available (use --device cpu)")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def network_config(settings: Settings):
    """The QuickNATConfig of [NETWORK]; invalid combinations become QnkitInputError."""
    from qnkit.nn.quicknat import QuickNATConfig

    try:
        cfg = QuickNATConfig.from_dict(dataclasses.asdict(settings.network))
    except ValueError as exc:
        raise QnkitInputError(f"[NETWORK]: {exc}") from None
    for section, key, value in (("DATA", "pad_multiple", settings.data.pad_multiple),
                                ("TRAINING", "crop_size", settings.training.crop_size)):
        if value % cfg.size_divisor:
            raise QnkitInputError(f"[{section}] {key} = {value} must be a multiple of {cfg.size_divisor} "
                                  f"(the network pools 4 times by {cfg.pool})")
    return cfg


def resume_settings(run_dir: Path, overrides: dict) -> Settings:
    """The run's own settings.ini, with only the overrides that make sense mid-run."""
    path = run_dir / "settings.ini"
    if not path.is_file() or not (run_dir / "checkpoints").is_dir():
        raise QnkitInputError(f"{run_dir}: nothing to resume (no settings.ini or checkpoints/)")
    settings = read_ini(path)
    current = settings.to_dict()
    for (section, key), value in overrides.items():
        if value is None:
            continue
        if (section, key) not in RESUME_CHANGEABLE:
            probe = Settings.from_dict(current)
            probe.set(section, key, value, "command line")
            if probe.to_dict()[section][key] != current[section][key]:
                raise QnkitInputError(f"cannot change [{section}] {key} when resuming ({run_dir}/settings.ini "
                                      f"has {current[section][key]!r})")
            continue
        settings.set(section, key, value, "command line")
    settings.validate("command line")
    if settings.to_dict() != current:
        from qnkit._atomic import write_text_atomic

        write_text_atomic(path, settings.to_ini())  # the run's settings are what it now trains with
    return settings


def init_settings(source_run: Path, path: str | None, overrides: dict) -> Settings:
    """Settings of a run that starts from `source_run`'s best weights (fine-tuning on new data).

    `path` (--settings) if given, else the source run's own settings.ini; then the command line. The
    model's pixel spacing is the source model's unless the command line sets one: its weights know
    only that scale.
    """
    source = read_init_source(source_run)
    if path is None:
        ini = Path(source_run) / "settings.ini"
        if not ini.is_file():
            raise QnkitInputError(f"--init-from {source_run}: no settings.ini there (give a qnkit train run folder)")
        settings = read_ini(ini)
    else:
        settings = load_settings(path)
    spacing = (source.get("domain") or {}).get("pixel_spacing_mm")
    if spacing and overrides.get(("DATA", "pixel_spacing_mm")) is None:
        settings.set("DATA", "pixel_spacing_mm", spacing, f"--init-from {source_run}")
    return apply_overrides(settings, overrides)


def read_init_source(source_run: Path) -> dict:
    """Metadata of the best checkpoint of `source_run` (verified), with the folder it lives in."""
    folder = ckpt.locate(Path(source_run), "best")
    return {**ckpt.read_meta(folder), "folder": folder}


def training_view(t) -> Augment | None:
    """What each training slice goes through: windows of [TRAINING] crop_size (with the random changes
    of [TRAINING] augment or without), whole augmented slices, or nothing."""
    if t.crop_size:
        return Augment(crop=t.crop_size, crop_kidney_p=t.crop_kidney_p) if t.augment else \
            Augment.crop_only(t.crop_size, t.crop_kidney_p)
    return Augment() if t.augment else None


def _reference_dataset(settings: Settings, params, cache_root: Path, target: str, info) -> SliceDataset | None:
    """[EVAL] reference_data's cases, preprocessed with the run's own parameters (None when unset)."""
    folder = settings.eval.reference_data
    if not folder:
        return None
    cases = D.discover_cases(Path(folder))
    root = cache_root / "reference"  # its own: its case ids are those of other cases (case_00002 ...)
    _on_main(info, lambda: D.build_cache(cases, params, root, workers=settings.common.num_workers))
    dist.barrier()
    entries = D.cached_entries(cases, params, root)
    return SliceDataset([entries[c.case_id] for c in cases], settings.data.pad_multiple, target, context=params.context)


#: How a 2-D run's weights start a 2.5-D run (qnkit.nn.quicknat.inflate_input_planes), as its record says it.
INFLATION_RULE = ("the source's input channel is the centre plane; the other planes get zero convolution weights "
                  "and the centre's batch-norm statistics and affine: the same output as the 2-D network at start")


#: How a narrower run's weights start a wider one (qnkit.nn.quicknat.widen_filters), as its record says it.
WIDENING_RULE = ("Net2WiderNet: filter j copies filter j mod F; the weights reading a copied channel are shared among "
                 "its copies (unequal shares summing to the old weight): the same output as the narrower network")


def _check_init_source(source: dict, source_run: Path, cfg, settings: Settings) -> dict:
    """The record of where a fine-tuning run's weights come from, once its network, HU window and context
    match; a 2-D source may start a 2.5-D run of the same network (its first block inflated, recorded)."""
    from qnkit.inference import model_context
    from qnkit.nn.quicknat import INPUT_PLANE_TENSORS

    theirs, ours = source.get("network") or {}, cfg.to_dict()
    loose = {"num_channels": 1, "num_filters": 0}
    same_but_these = {**theirs, **loose} == {**ours, **loose}
    inflate = same_but_these and theirs.get("num_channels", 1) == 1 and ours["num_channels"] > 1
    widen = same_but_these and theirs.get("num_filters", ours["num_filters"]) < ours["num_filters"]
    planes_ok = inflate or theirs.get("num_channels") == ours["num_channels"]
    filters_ok = widen or theirs.get("num_filters") == ours["num_filters"]
    if theirs != ours and not (same_but_these and planes_ok and filters_ok):
        diff = ", ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in ours if theirs.get(k) != ours.get(k))
        raise QnkitInputError(f"--init-from {source_run}: its network differs ({diff}; only num_channels 1 there "
                              f"may become more here, and num_filters more)")
    context = model_context(source)
    if not inflate and context != (cfg.num_channels, float(settings.data.context_mm) if cfg.num_channels > 1 else None):
        raise QnkitInputError(f"--init-from {source_run}: its {context[0]} input planes are {context[1]} mm apart, "
                              f"this run's {settings.data.context_mm:g} mm")
    pre = source.get("preprocessing") or {}
    window = (float(settings.data.hu_lo), float(settings.data.hu_hi))
    if (pre.get("hu_lo"), pre.get("hu_hi")) != window:
        raise QnkitInputError(f"--init-from {source_run}: its HU window is {pre.get('hu_lo')}..{pre.get('hu_hi')}, "
                              f"this run's {window[0]:g}..{window[1]:g}")
    record = {"run_dir": str(Path(source_run).absolute()), "checkpoint": "best", "epoch": source.get("epoch"),
              "model_sha256": (source.get("files") or {}).get("model.safetensors")}
    if inflate:
        record["inflated"] = {"from_planes": 1, "to_planes": cfg.num_channels, "tensors": list(INPUT_PLANE_TENSORS),
                              "rule": INFLATION_RULE}
    if widen:
        record["widened"] = {"from_filters": theirs["num_filters"], "to_filters": cfg.num_filters,
                             "rule": WIDENING_RULE}
    return record


def qat_teacher(cfg, initialised_from: dict | None):
    """The FP32 network a [TRAINING] qat_teacher run learns to agree with: its --init-from source's best weights
    (checked against the hash recorded at the start, so that a resume trains towards the same network)."""
    if initialised_from is None:
        raise QnkitInputError("[TRAINING] qat_teacher needs --init-from: the FP32 network whose output is the target")
    folder = ckpt.locate(Path(initialised_from["run_dir"]), "best")
    recorded = initialised_from.get("model_sha256")
    if recorded and (ckpt.read_meta(folder).get("files") or {}).get("model.safetensors") != recorded:
        raise QnkitInputError(f"[TRAINING] qat_teacher: {folder} is no longer the checkpoint this run started from")
    return _source_network(cfg, folder, initialised_from)


def _source_network(cfg, folder: Path, initialised_from: dict):
    """The network of `cfg` holding the --init-from source's weights (`folder`), inflated or widened as its record
    says."""
    model = ckpt.build_model(cfg.to_dict())
    ckpt.load_weights(folder, model, inflate="inflated" in initialised_from,
                      widen_from=(initialised_from.get("widened") or {}).get("from_filters"))
    return model


def _prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> str:
    """Check RUN_DIR; return 'new' / 'empty' when this run starts it (a failed start then cleans up)."""
    if resume:
        if not run_dir.is_dir():
            raise QnkitInputError(f"{run_dir}: no such run folder to resume")
        return "resume"
    if run_dir.exists() and not run_dir.is_dir():
        raise QnkitInputError(f"{run_dir} exists and is not a folder")
    if not run_dir.exists():
        return "new"
    if any(run_dir.iterdir()):
        if not force:
            raise QnkitInputError(f"{run_dir} exists and is not empty (use --resume to continue it, "
                                  f"--force to start over)")
        return "forced"
    return "empty"


def _undo_start(run_dir: Path, state: str) -> None:
    """Remove what a failed start wrote into a run folder that was new or empty."""
    if state == "new":
        shutil.rmtree(run_dir, ignore_errors=True)
    elif state == "empty" and run_dir.is_dir():
        for child in run_dir.iterdir():
            remove_path(child)


def _clear_artefacts(run_dir: Path) -> None:
    for name in ARTEFACTS:
        remove_path(run_dir / name)


def _cache_root(settings: Settings, run_dir: Path) -> Path:
    c = settings.data.cache_dir
    return run_dir / "cache" if not c else (Path(c) if os.path.isabs(c) else run_dir / c)


def _set_threads(settings: Settings, info: dist.DistInfo) -> None:
    # [COMMON] num_threads first; then QNKIT_NUM_THREADS, per process as for inference; else the cores,
    # shared among this machine's ranks (two 2-thread processes on 2 cores spend their time spinning).
    n = (settings.common.num_threads or requested_threads()
         or max(1, available_cpus() // max(info.local_world_size, 1)))
    torch.set_num_threads(n)


def _deterministic(device: torch.device) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Max-unpooling with non-overlapping pools writes each output once, so it is deterministic in practice.
    warnings.filterwarnings("ignore", message="max_unpooling2d.*deterministic")
    torch.backends.cudnn.benchmark = False


def _on_main(info: dist.DistInfo, fn):
    """Run fn on rank 0; other ranks wait, and an input error there is raised on every rank."""
    error, result = None, None
    if info.is_main:
        try:
            result = fn()
        except QnkitInputError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error is not None:
        raise QnkitInputError(error)
    return result


def train(data_dir: Path | None, run_dir: Path, settings: Settings, *, resume: bool = False, force: bool = False,
          console=None, init_from: Path | None = None) -> dict:
    """Train (or resume) a run; returns a summary dict (best Dice, epochs, parameters, seconds).

    `init_from` (a run folder) starts from its best weights instead of a random initialisation, with a
    fresh optimiser and schedule: fine-tuning a model on new data. The run records where they came from.
    """
    started = time.perf_counter()
    info = dist.from_env()
    run_dir = Path(run_dir)
    device = resolve_device(settings.common.device, info)
    cfg = network_config(settings)
    if init_from is not None and resume:
        raise QnkitInputError("--init-from starts a new run; --resume continues one (its weights are its own)")
    source = read_init_source(init_from) if init_from is not None else None
    initialised_from = _check_init_source(source, init_from, cfg, settings) if source is not None else None
    start_state = _prepare_run_dir(run_dir, resume, force) if info.is_main else "other-rank"
    dist.init(info, device, settings.common.dist_backend)
    try:
        if resume:
            try:
                splits = json.loads((run_dir / "splits.json").read_text())
            except (OSError, ValueError) as exc:
                raise QnkitInputError(f"{run_dir}/splits.json: cannot resume without it ({exc})") from None
            data_dir = Path(data_dir or splits["data_dir"])
            by_id = {c.case_id: c for c in D.discover_cases(data_dir)}
            missing = [i for i in splits["train"] + splits["validation"] if i not in by_id]
            if missing:
                raise QnkitInputError(f"{data_dir}: cases of this run are missing: {', '.join(missing[:5])}")
            train_ids, val_ids = splits["train"], splits["validation"]
            pool = [by_id[i] for i in train_ids + val_ids]
            filtered = splits["filtered"]
            spacing = (splits.get("preprocessing") or {}).get("pixel_spacing_mm")
        else:
            if data_dir is None:
                raise QnkitInputError("--data is required")
            cases = D.discover_cases(data_dir)
            pool, test = D.split_test(cases, settings.data.test_fraction, settings.common.seed)
            spacing = D.resolve_pixel_spacing(settings.data.pixel_spacing_mm, pool)
        params = D.PreprocessParams.from_settings(settings.data, spacing, cfg.num_channels)
        cache_root = _cache_root(settings, run_dir)

        def build():
            run_dir.mkdir(parents=True, exist_ok=True)
            D.build_cache(pool, params, cache_root,
                          progress=(lambda cid: console.log(f"cached {cid}")) if console else None,
                          workers=settings.common.num_workers)
            if start_state == "forced":
                _clear_artefacts(run_dir)  # only once the data are known to be good

        _on_main(info, build)
        dist.barrier()
        entries = D.cached_entries(pool, params, cache_root)
        target = "coverage" if settings.data.soft_targets else "labels"
        reference_ds = _reference_dataset(settings, params, cache_root, target, info)
        if not resume:
            kept, filtered = D.apply_filter(entries, pool, settings.data)
            train_ids, val_ids = D.split_train_val(kept, settings.data.val_fraction, settings.common.seed)
        by_id = {c.case_id: c for c in pool}
        used = train_ids + val_ids
        domain = D.model_domain(params, [entries[i] for i in used], [by_id[i] for i in used],
                                settings.data.pad_multiple)
        if not resume:
            if info.is_main:
                D.write_splits(run_dir, data_dir=Path(data_dir), seed=settings.common.seed, test=test,
                               train=train_ids, val=val_ids, filtered=filtered, params=params, domain=domain)
                from qnkit._atomic import write_text_atomic

                write_text_atomic(run_dir / "settings.ini", settings.to_ini())
    except BaseException:
        if info.is_main:
            _undo_start(run_dir, start_state)
        raise
    _set_threads(settings, info)  # process-wide torch settings: only once the input is known to be good
    if settings.common.deterministic:
        _deterministic(device)
    train_entries = [entries[i] for i in train_ids]
    augment = training_view(settings.training)
    train_ds = SliceDataset(train_entries, D.training_pad_multiple(train_entries, settings.data.pad_multiple), target,
                            augment=augment, context=params.context)
    val_ds = SliceDataset([entries[i] for i in val_ids], settings.data.pad_multiple, target, context=params.context)
    if info.is_main and console is not None:
        console.print(f"cases: {len(train_ids)} train ({len(train_ds)} slices), {len(val_ids)} validation, "
                      f"{len(filtered)} filtered; world size {info.world_size}, device {device}")
        per_epoch = slices_per_epoch(settings.training, len(train_ds))
        if per_epoch > len(train_ds):
            console.print(f"{per_epoch} training slices per epoch (each about {per_epoch / len(train_ds):.1f} times): "
                          f"[TRAINING] min_steps_per_epoch = {settings.training.min_steps_per_epoch}")

    seed_everything(settings.common.seed)
    model = (_source_network(cfg, source["folder"], initialised_from) if source is not None
             else ckpt.build_model(cfg.to_dict()))
    meta = {"network": cfg.to_dict(), "parameters": count_parameters(model),
            "preprocessing": {**params.record(), "pad_multiple": settings.data.pad_multiple,
                              "pad_value": 0.0, "threshold": settings.eval.threshold},
            "domain": domain,
            "data": {"train": train_ids, "validation": val_ids, "filtered": filtered}}
    last_epoch = None
    if resume:
        folder = ckpt.locate(run_dir, "last")
        last_meta = ckpt.read_meta(folder)
        last_epoch = last_meta["epoch"]
        initialised_from = last_meta.get("initialised_from")
    if initialised_from is not None:
        meta["initialised_from"] = initialised_from
    logger = Logger(run_dir, log_dir=settings.common.log_dir, enabled=info.is_main, purge_after=last_epoch)
    try:
        teacher = qat_teacher(cfg, initialised_from) if settings.training.qat_teacher else None
        solver = Solver(model, settings, device=device, info=info, run_dir=run_dir, meta=meta, logger=logger,
                        teacher=teacher)
        restarted = solver.resume_from(folder) if resume else False
        if info.is_main and console is not None:
            t = settings.training
            console.print(f"QuickNAT {meta['parameters']:,} parameters; micro-batch {t.micro_batch} x "
                          f"{solver.accum} accumulation x {info.world_size} ranks = effective batch "
                          f"{t.micro_batch * solver.accum * info.world_size}; {describe_step(solver)}")
            if initialised_from is not None and not resume:
                inflated, widened = initialised_from.get("inflated"), initialised_from.get("widened")
                console.print(f"weights from {initialised_from['run_dir']} (best, epoch {initialised_from['epoch']})"
                              + (f"; its one input plane inflated to {inflated['to_planes']}" if inflated else "")
                              + (f"; its {widened['from_filters']} filters widened to {widened['to_filters']}"
                                 if widened else ""))
            if restarted:
                decay = (f"poly to epoch {t.epochs}" if t.schedule == "poly"
                         else f"x{t.gamma:g} every {t.step_size} epoch(s)")
                console.print(f"learning-rate schedule restarted at epoch {solver.loop['epoch']}: lr {t.lr:g}, {decay}")
        loop = solver.fit(train_ds, val_ds, console, reference_ds=reference_ds)
    finally:
        logger.close()
        dist.barrier()
        dist.shutdown()
    return {**loop, "parameters": meta["parameters"], "seconds": time.perf_counter() - started,
            "train_cases": len(train_ids), "val_cases": len(val_ids), "world_size": info.world_size}
