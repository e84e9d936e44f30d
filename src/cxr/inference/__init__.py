"""Inference: the one path from a film to calibrated per-finding probabilities, the gate and ONNX export."""
