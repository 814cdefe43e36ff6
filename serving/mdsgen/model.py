"""Copied into each version folder by `mdsgen serve`; the model lives in the mdsgen package
(mdsgen/triton_model.py), which the server's Python must have installed."""
from mdsgen.triton_model import TritonPythonModel  # noqa: F401
