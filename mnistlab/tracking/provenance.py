"""Provenance: the code and library versions a run or an export was made with."""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_PACKAGES = ("mnistlab", "torch", "torchvision", "optuna", "mlflow", "numpy", "safetensors")
EXPORT_PACKAGES = ("mnistlab", "torch", "onnx", "onnxruntime", "safetensors", "numpy", "optuna", "mlflow")


def environment() -> dict[str, Any]:
    """Git commit and library versions, logged with every run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"git_commit": commit, "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions(RUN_PACKAGES)}


def versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Each package's installed version (None where it is not installed)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
