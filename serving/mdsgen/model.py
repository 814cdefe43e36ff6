"""Copied into each version folder by `mdsgen serve`; the model lives in the mdsgen package
(mdsgen/serving/triton_model.py), which the server's Python must have installed."""
from mdsgen.serving.triton_model import TritonPythonModel  # noqa: F401
