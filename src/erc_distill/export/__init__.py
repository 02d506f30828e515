"""Export: ONNX graphs checked against PyTorch (INT8 quantization and TensorRT engines build on them)."""
