"""Part of the MLflow adapter (with tracker.py and client.py): the model registry."""

from __future__ import annotations

import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from mnistlab.tracking.tracker import Tracker

REGISTRY_ALIAS = "best"


def register_model(tracker: Tracker, name: str, run_id: str | None, experiment_id: str | None, onnx_file: Path,
                   example: Any, tags: dict[str, Any]) -> int:
    """Register an exported model as ``models:/NAME@best``: a pyfunc that maps pixels to digits.

    The pyfunc is MLflow's "model from code" (``mnistlab/tracking/serving.py``) over the ONNX file, so
    loading it needs MLflow, numpy and onnxruntime only. Returns the new version number, or that of
    ``@best`` when it already is this very model (the same run, the same tags: the ONNX file's SHA-256
    among them), so that running the same `best --export` again registers nothing twice.
    """
    import mlflow
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    same = _registered(tracker, name, run_id, tags)
    if same is not None:  # the same command run again: the version it registered stands
        return same
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
                               outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mnistlab prints the outcome itself
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    try:
        if experiment_id:
            mlflow.set_experiment(experiment_id=experiment_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's advice on pinning requirements: they are pinned here
            info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                             python_model=str(Path(__file__).with_name("serving.py")),
                             artifacts={"onnx": str(onnx_file)}, signature=signature, input_example=example,
                             pip_requirements=[f"mlflow=={metadata.version('mlflow')}",
                                               f"onnxruntime=={metadata.version('onnxruntime')}",
                                               f"numpy=={metadata.version('numpy')}"],
                             registered_model_name=name, await_registration_for=60)
        version = int(info.registered_model_version)
        tracker.client.set_registered_model_alias(name, REGISTRY_ALIAS, str(version))
        for key, value in tags.items():
            tracker.client.set_model_version_tag(name, str(version), key, str(value))
        return version
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def _registered(tracker: Tracker, name: str, run_id: str | None, tags: dict[str, Any]) -> int | None:
    """The version ``@best`` names when it is the model about to be registered, else None."""
    try:
        current = tracker.client.get_model_version_by_alias(name, REGISTRY_ALIAS)
    except Exception:  # no such model or alias yet (MLflow raises its own error type)
        return None
    if current.run_id != run_id or any(current.tags.get(k) != str(v) for k, v in tags.items()):
        return None
    return int(current.version)
