"""Python client for the medgemma ensemble (tritonclient gRPC; no torch)."""
