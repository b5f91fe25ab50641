"""ONNX export: GraphModule -> checked ONNX model, optional onnxsim, metadata, atomic write."""

from fxcompress.export.atomic import write_atomically
from fxcompress.export.onnx_export import export_model_proto, load_onnx

__all__ = ["export_model_proto", "load_onnx", "write_atomically"]
