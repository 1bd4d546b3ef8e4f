"""ONNX export of runs (``carclf export``); the runtime side lives in :mod:`carclf.infer.onnx_engine`."""
