"""Deployment exports: ONNX (torch.onnx dynamo exporter, validated by ONNX Runtime) and TensorRT engines."""
