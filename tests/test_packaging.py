"""What the distribution installs: every package folder, the run-time data files, and one ONNX Runtime.

The package list and package data are read from setup.py itself (imported under another name, so that
setup() does not run) and compared with the folders and files in the checkout, so that a new
sub-package or data file cannot be left out of the wheel the way qnkit.dicom once was. The wheel
itself is built and run by .ci/wheel_smoke.sh, not here.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# SPEC section 3: the top-level folders of the checkout and the import names they are installed under.
SPEC_LAYOUT = {"qnkit": "qnkit", "qnkit.train": "train", "qnkit.export": "export", "qnkit.benchmarks": "benchmarks"}

# Files in the package folders that are deliberately not installed: shell drivers that run from a checkout
# (benchmarks/gpu_session.sh and friends install the checkout on a lent GPU machine themselves), and the
# committed results the README quotes (benchmarks/results/*.json: figures of one machine, not run-time data).
CHECKOUT_ONLY = {"qnkit.benchmarks": ["*.sh", "results/*.json"]}

# Build products and caches that live beside the sources in a working tree.
BUILD_PRODUCTS = ("*.pyc", "*.so", "*.pyd", "*.c")

# The ONNX Runtime distributions that install the one `onnxruntime` module folder.
ONNX_RUNTIMES = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-rocm")

# The execution providers the README promises for each install: [cpu] -> onnxruntime, [gpu] -> onnxruntime-gpu.
PROMISED_PROVIDERS = {
    "onnxruntime": {"CPUExecutionProvider"},
    "onnxruntime-gpu": {"CUDAExecutionProvider", "CPUExecutionProvider"},
}


def _setup_layout():
    """setup.py as a module: PACKAGE_FOLDERS, PACKAGE_DATA and discover_packages(), without running setup()."""
    spec = importlib.util.spec_from_file_location("qnkit_setup_layout", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_folders_on_disk() -> dict[str, Path]:
    """Import name -> folder for every folder with an __init__.py under the SPEC's four top-level folders."""
    found = {}
    for import_name, folder in SPEC_LAYOUT.items():
        root = REPO / folder
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                relative = Path(dirpath).relative_to(root).parts
                found[".".join((import_name, *relative))] = Path(dirpath)
    return found


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_onnx_runtimes() -> dict[str, importlib.metadata.Distribution]:
    installed = {}
    for dist in importlib.metadata.distributions():
        name = _normalised(dist.metadata["Name"] or "")
        if name in ONNX_RUNTIMES:
            installed[name] = dist
    return installed


def test_setup_keeps_the_spec_layout():
    assert _setup_layout().PACKAGE_FOLDERS == SPEC_LAYOUT


def test_setup_finds_every_package_folder():
    """Each folder with an __init__.py is a package of the wheel, and each package of the wheel is a folder."""
    packages = _setup_layout().discover_packages(str(REPO))
    on_disk = _package_folders_on_disk()
    assert "qnkit.dicom" in on_disk  # the package a hand-kept list once forgot; the walk must see it
    missing = sorted(set(on_disk) - set(packages))
    assert not missing, f"setup.py does not install these package folders: {missing}"
    assert sorted(packages) == sorted(on_disk), f"setup.py lists packages with no folder: {set(packages) - set(on_disk)}"


def test_no_module_folder_without_an_init():
    """A folder of Python modules without __init__.py is not found by find_packages, so it would not install."""
    for folder in SPEC_LAYOUT.values():
        for dirpath, dirnames, filenames in os.walk(REPO / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if any(name.endswith(".py") for name in filenames):
                assert "__init__.py" in filenames, f"{Path(dirpath).relative_to(REPO)} has modules but no __init__.py"


def _matched(folder: Path, patterns) -> set[Path]:
    """The files that setuptools' package_data globs (relative to the package folder) select."""
    return {path for pattern in patterns for path in folder.glob(pattern) if path.is_file()}


def test_package_data_covers_every_run_time_file():
    """Every file of a package folder that is not a module is installed as package data or is checkout-only."""
    layout = _setup_layout()
    packages = _package_folders_on_disk()
    sub_package_folders = set(packages.values())
    not_installed = []
    for name, folder in packages.items():
        installed = _matched(folder, layout.PACKAGE_DATA.get(name, ()))
        exempt = _matched(folder, CHECKOUT_ONLY.get(name, ()))
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            # a sub-package's files are checked under that package's own name
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and here / d not in sub_package_folders]
            for filename in filenames:
                path = here / filename
                if filename.endswith(".py") or any(path.match(p) for p in BUILD_PRODUCTS):
                    continue
                if path not in installed and path not in exempt:
                    not_installed.append(str(path.relative_to(REPO)))
    assert not not_installed, f"files not installed by setup.py's PACKAGE_DATA: {sorted(not_installed)}"


def test_package_data_holds_every_shipped_bundle_artefact():
    """The registry and, for each registered model, its qnkit.json and every artefact its manifest lists."""
    import json

    layout = _setup_layout()
    models = REPO / "qnkit" / "models"
    installed = _matched(models, layout.PACKAGE_DATA["qnkit.models"])
    assert models / "registry.json" in installed
    registry = json.loads((models / "registry.json").read_text(encoding="utf-8"))
    assert registry["models"], "no shipped model registered"
    for name in registry["models"]:
        metadata = json.loads((models / name / "qnkit.json").read_text(encoding="utf-8"))
        needed = {models / name / "qnkit.json", *(models / name / artefact for artefact in metadata["artefacts"])}
        assert needed <= installed, f"{name}: not installed: {sorted(str(p) for p in needed - installed)}"


def test_exactly_one_onnx_runtime_is_installed():
    """onnxruntime and onnxruntime-gpu write the same module folder: with both, either can be the one imported."""
    installed = _installed_onnx_runtimes()
    assert len(installed) == 1, f"install exactly one ONNX Runtime ([cpu] or [gpu]), found {sorted(installed)}"


def test_the_onnx_runtime_module_is_whole_and_its_providers_are_the_promised_ones():
    installed = _installed_onnx_runtimes()
    assert len(installed) == 1, f"which of {sorted(installed)} owns the onnxruntime module cannot be told"
    (name, dist), = installed.items()
    # uninstalling one of two runtimes deletes files the other one installed; every file must still be there
    module_files = [f for f in dist.files or () if f.parts[0] == "onnxruntime"]
    assert module_files, f"{name} lists no files under onnxruntime/"
    lost = [str(f) for f in module_files if not Path(dist.locate_file(f)).exists()]
    assert not lost, f"{name} is damaged ({len(lost)} files missing, e.g. {lost[:3]}): reinstall it alone"

    import onnxruntime

    assert Path(onnxruntime.__file__).resolve() == Path(dist.locate_file("onnxruntime/__init__.py")).resolve()
    assert onnxruntime.__version__ == dist.version, (onnxruntime.__version__, name, dist.version)
    assert name in PROMISED_PROVIDERS, f"{name} is not one of the runtimes the README documents"
    missing = PROMISED_PROVIDERS[name] - set(onnxruntime.get_available_providers())
    assert not missing, f"{name} {dist.version} lacks the promised providers {sorted(missing)}"


def _requirements(pyproject: dict) -> tuple[list[str], dict[str, list[str]]]:
    project = pyproject["project"]
    return project["dependencies"], project["optional-dependencies"]


def _onnx_runtimes_of(requirements: list[str], extras: dict[str, list[str]], seen=()) -> set[str]:
    """The ONNX Runtime distributions a list of requirements pulls in, following qnkit[...] self-references."""
    found = set()
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", requirement)
        name = _normalised(match.group(1))
        if name == "qnkit":
            for extra in (e.strip() for e in (match.group(2) or "").split(",") if e.strip()):
                if extra not in seen:
                    found |= _onnx_runtimes_of(extras[extra], extras, (*seen, extra))
        elif name in ONNX_RUNTIMES:
            found.add(name)
    return found


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in the standard library from Python 3.11")
def test_no_extra_installs_two_onnx_runtimes():
    """ONNX Runtime comes from [cpu] or [gpu] only, never the core; no extra (dev included) brings both."""
    import tomllib

    core, extras = _requirements(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8")))
    assert _onnx_runtimes_of(core, extras) == set(), "a core ONNX Runtime would sit beside the [gpu] one"
    assert _onnx_runtimes_of(extras["cpu"], extras) == {"onnxruntime"}
    assert _onnx_runtimes_of(extras["gpu"], extras) == {"onnxruntime-gpu"}
    for extra, requirements in extras.items():
        assert len(_onnx_runtimes_of(requirements, extras, (extra,))) <= 1, f"[{extra}] installs two ONNX Runtimes"
    assert _onnx_runtimes_of(extras["dev"], extras) == {"onnxruntime"}, "CI ([dev]) tests the [cpu] runtime"
