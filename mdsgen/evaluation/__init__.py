"""Metrics, the alignment classifier, the evaluation report, MLflow tracking and the model registry."""
