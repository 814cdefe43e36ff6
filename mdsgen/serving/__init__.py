"""Triton serving, the gRPC client, monitoring, the MLflow pyfunc and the web page."""
