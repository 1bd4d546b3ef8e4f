"""HTTP service: FastAPI app around the Predictor (``carclf serve``), with an upload page."""
