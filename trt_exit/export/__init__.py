"""Stage split, ONNX export, precision passes and parity checks."""
