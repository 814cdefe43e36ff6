"""Kubeflow pipelines for mdsgen: `python -m pipelines compile | run-local | submit`."""
