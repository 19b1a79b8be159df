"""ONNX Runtime inference service (Open Inference Protocol v2 + /predict) and local prediction; imports no torch."""
