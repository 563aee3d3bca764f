"""Part of the MLflow adapter (with tracker.py and client.py): the model registry."""

from __future__ import annotations

import tempfile
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
    import logging

    import mlflow.pyfunc
    import numpy as np
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    same = _registered(tracker, name, run_id, tags)
    if same is not None:  # the same command run again: the version it registered stands
        return same
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
                               outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mnistlab prints the outcome itself
    # What MLflow's fluent Model.log does, through this tracker's client: no global tracking or
    # registry URI is set, so nothing else in the process logs to the wrong store.
    client = tracker.client
    run = client.get_run(run_id) if run_id else None
    if run is not None:
        experiment_id = experiment_id or run.info.experiment_id
    params = {k: str(v) for k, v in run.data.params.items()} if run is not None else {}
    logged = client.create_logged_model(experiment_id or "0", name="model", source_run_id=run_id, params=params)
    try:
        if run_id:
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's advice on pinning requirements: they are pinned here
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local), python_model=str(Path(__file__).with_name("serving.py")),
                artifacts={"onnx": str(onnx_file)}, signature=signature, input_example=example,
                pip_requirements=[f"mlflow=={metadata.version('mlflow')}",
                                  f"onnxruntime=={metadata.version('onnxruntime')}",
                                  f"numpy=={metadata.version('numpy')}"],
                mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                   run_id=run_id, model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
        client.finalize_logged_model(logged.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    try:
        client.create_registered_model(name)
    except Exception:  # it exists already (MLflow raises its own error type)
        client.get_registered_model(name)  # anything else (a server down, no access) is raised from here
    version = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id,
                                          model_id=logged.model_id, await_creation_for=60).version
    client.set_registered_model_alias(name, REGISTRY_ALIAS, str(version))
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    return int(version)


def _registered(tracker: Tracker, name: str, run_id: str | None, tags: dict[str, Any]) -> int | None:
    """The version ``@best`` names when it is the model about to be registered, else None."""
    try:
        current = tracker.client.get_model_version_by_alias(name, REGISTRY_ALIAS)
    except Exception:  # no such model or alias yet (MLflow raises its own error type)
        return None
    if current.run_id != run_id or any(current.tags.get(k) != str(v) for k, v in tags.items()):
        return None
    return int(current.version)
