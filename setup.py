# cffi's API-mode build hooks into setuptools through cffi_modules, which
# pyproject.toml alone cannot express.
from setuptools import setup

setup(cffi_modules=["csrc/build_core.py:ffibuilder"])
