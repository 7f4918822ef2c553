"""Export: TorchScript, ONNX and torch.export artifacts, their manifest, validation and INT8 quantization."""
