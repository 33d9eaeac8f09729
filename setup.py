"""Build hook for the cffi C shim; all metadata lives in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["llamahot/_build_shim.py:ffibuilder"])
