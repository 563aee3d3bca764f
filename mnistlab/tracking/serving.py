"""The MLflow pyfunc of an exported mnistlab model: pixels in, digits out.

Logged as an MLflow "model from code": MLflow copies this file beside the ONNX file and
runs it on load, so serving needs MLflow, numpy and onnxruntime only (not mnistlab).
Input: float32 pixels in [0, 1] shaped (N, 1, 28, 28). Output: int64 digits (N,).
"""

import mlflow
import numpy as np


class DigitClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow's interface
        import onnxruntime as ort

        self.session = ort.InferenceSession(context.artifacts["onnx"], providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # noqa: ANN001
        if isinstance(model_input, dict):  # a named tensor
            (model_input,) = model_input.values()
        pixels = np.asarray(model_input, dtype=np.float32).reshape(-1, 1, 28, 28)
        return self.session.run(None, {self.input: pixels})[0].argmax(1).astype(np.int64)


mlflow.models.set_model(DigitClassifier())
