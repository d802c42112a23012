"""`qnkit train`: train QuickNAT on a KiTS19-layout folder (also under torchrun)."""
from __future__ import annotations

from pathlib import Path

import typer

from qnkit.commands import choices


def command(
    data: Path = typer.Option(None, "--data", help="KiTS19-layout folder: case_XXXXX/{imaging,segmentation}.nii.gz "
                                                   "(+ kits.json). Optional with --resume."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoints, logs, splits, cache)."),
    settings: str = typer.Option(None, "--settings", help="Settings .ini file, or a preset: local | cluster | shipped | shipped-gpu."),
    epochs: int = typer.Option(None, "--epochs", help="[TRAINING] epochs."),
    num_filters: int = typer.Option(None, "--num-filters", help="[NETWORK] num_filters."),
    micro_batch: int = typer.Option(None, "--micro-batch", help="[TRAINING] micro_batch (slices per forward pass)."),
    effective_batch: int = typer.Option(None, "--effective-batch", help="[TRAINING] effective_batch (all ranks)."),
    lr: float = typer.Option(None, "--lr", help="[TRAINING] lr. With --resume: restart the schedule from it."),
    schedule: choices.Schedule = typer.Option(None, "--schedule", callback=choices.plain, show_default=False,
                                              help="[TRAINING] schedule: step (StepLR, the report's) or poly "
                                                   "(lr x (1 - e/E)^0.9 to the run's last epoch, nnU-Net's). "
                                                   "With --resume: restart the schedule."),
    step_size: int = typer.Option(None, "--step-size", help="[TRAINING] step_size: epochs between learning-rate "
                                                            "decays. With --resume: restart the schedule."),
    gamma: float = typer.Option(None, "--gamma", help="[TRAINING] gamma: the factor of each decay."),
    min_steps_per_epoch: int = typer.Option(None, "--min-steps-per-epoch",
                                            help="[TRAINING] min_steps_per_epoch: a small data set repeats its "
                                                 "slices within an epoch up to this many optimiser steps "
                                                 "(0: one pass)."),
    device: choices.TrainDevice = typer.Option(None, "--device", callback=choices.plain, show_default=False,
                                               help="[COMMON] device."),
    seed: int = typer.Option(None, "--seed", help="[COMMON] seed (splits, initialisation, shuffling)."),
    num_workers: int = typer.Option(None, "--num-workers", help="[COMMON] num_workers of the DataLoader."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="[DATA] cache_dir for the preprocessed .npy cache."),
    pixel_spacing_mm: str = typer.Option(None, "--pixel-spacing-mm", metavar="MM|auto",
                                         help="[DATA] pixel_spacing_mm: the in-plane pixel spacing the model works "
                                              "at; auto = 2 x the median of the training cases (default)."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="[TRAINING] amp: mixed precision: float16 on CUDA, "
                             "bfloat16 on a CPU with native bf16 (AVX512-BF16, AMX), FP32 on other CPUs."),
    compile_step: bool = typer.Option(None, "--compile/--no-compile", help="[TRAINING] compile: torch.compile the "
                                      "training step (a minute or two of compiling at each start)."),
    qat: bool = typer.Option(None, "--qat/--no-qat", help="[TRAINING] qat: quantisation-aware fine-tuning: the "
                             "convolutions export puts in INT8 train through INT8 arithmetic (with --init-from, a "
                             "low --lr, an epoch or two)."),
    qat_teacher: bool = typer.Option(None, "--qat-teacher/--no-qat-teacher",
                                     help="[TRAINING] qat_teacher: with --qat, train towards the FP32 network it "
                                          "started from (--init-from) instead of the labels."),
    augment: bool = typer.Option(None, "--augment/--no-augment", help="[TRAINING] augment: random scale, rotation, "
                                                                      "contrast, blur and noise per slice."),
    crop_size: int = typer.Option(None, "--crop-size", help="[TRAINING] crop_size: train on square windows of this many "
                                                            "pixels (0: whole slices). With --resume: from now on."),
    hard_negative_weight: float = typer.Option(None, "--hard-negative-weight", metavar="W",
                                               help="[DATA] hard_negative_weight: the loss weight of each case's "
                                                    "hard_negatives.nii.gz voxels (qnkit synth's renal sinus and "
                                                    "hilum) as a multiple of its kidney's class weight; 0: off."),
    class_weights: choices.ClassWeights = typer.Option(
        None, "--class-weights", callback=choices.plain, show_default=False,
        help="[DATA] class_weights: QuickNAT's median-frequency class weights, or none (every pixel 1, as nnU-Net's "
             "cross-entropy); the border weight stays."),
    reference_data: str = typer.Option(None, "--reference-data", metavar="DIR",
                                       help="[EVAL] reference_data: held-out cases scored after every epoch beside "
                                            "the validation split (metrics.jsonl reference_dice)."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="[COMMON] progress bar."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    init_from: Path = typer.Option(None, "--init-from", metavar="RUN_DIR",
                                   help="Start from the best weights of another run (fine-tuning on new data), "
                                        "with a fresh optimiser and schedule. Its settings.ini is the default "
                                        "for --settings, and its pixel spacing the model's; the network and HU "
                                        "window must match, except that a 2-D run may start a 2.5-D one "
                                        "([NETWORK] num_channels > 1: its first block inflated)."),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty --out (removes its checkpoints "
                                                      "and logs; keeps the cache)."),
) -> None:
    """Train QuickNAT (alpha*Dice + beta*weighted BCE, Adam, StepLR, early stopping) and keep the best checkpoint.

    Settings come from the dataclass defaults, then --settings, then these options. Under
    `torchrun --nproc_per_node=N -m qnkit train ...` it trains with DistributedDataParallel.
    """
    from qnkit.errors import QnkitInputError, require

    require("qnkit train", "torch", "safetensors", "tensorboard", extra="train")  # before anything else
    from rich.console import Console

    from qnkit.train import distributed as dist
    from qnkit.train.runner import init_settings, resume_settings, train
    from qnkit.train.settings import load_settings

    overrides = {
        ("TRAINING", "epochs"): epochs, ("NETWORK", "num_filters"): num_filters,
        ("TRAINING", "micro_batch"): micro_batch, ("TRAINING", "effective_batch"): effective_batch,
        ("TRAINING", "lr"): lr, ("TRAINING", "schedule"): schedule, ("TRAINING", "step_size"): step_size, ("TRAINING", "gamma"): gamma,
        ("TRAINING", "min_steps_per_epoch"): min_steps_per_epoch,
        ("COMMON", "device"): device, ("COMMON", "seed"): seed,
        ("COMMON", "num_workers"): num_workers, ("DATA", "cache_dir"): cache_dir, ("TRAINING", "amp"): amp,
        ("TRAINING", "compile"): compile_step, ("TRAINING", "qat"): qat, ("TRAINING", "qat_teacher"): qat_teacher,
        ("DATA", "pixel_spacing_mm"): pixel_spacing_mm, ("DATA", "hard_negative_weight"): hard_negative_weight,
        ("DATA", "class_weights"): class_weights,
        ("TRAINING", "augment"): augment, ("COMMON", "progress"): progress,
        ("TRAINING", "crop_size"): crop_size, ("EVAL", "reference_data"): reference_data,
    }
    if resume and force:
        raise QnkitInputError("--resume and --force exclude each other")
    if init_from is not None and resume:
        raise QnkitInputError("--init-from starts a new run; --resume continues one (its weights are its own)")
    if init_from is not None:
        cfg = init_settings(init_from, settings, overrides)
    elif resume:
        if settings is not None:
            raise QnkitInputError("--settings cannot be used with --resume (the run's settings.ini is used)")
        cfg = resume_settings(out, overrides)
    else:
        cfg = load_settings(settings, overrides)
    console = Console(stderr=True) if dist.from_env().is_main else None
    summary = train(data, out, cfg, resume=resume, force=force, console=console, init_from=init_from)
    if console is not None:
        state = "stopped early" if summary["stopped_early"] else "finished"
        console.print(f"{state} after {summary['epoch']} epoch(s) in {summary['seconds']:.1f} s; best validation "
                      f"Dice {summary['best_dice']:.4f} (epoch {summary['best_epoch']}); checkpoints in "
                      f"{out / 'checkpoints'}")
