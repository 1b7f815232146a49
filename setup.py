# Only for cffi_modules, which pyproject.toml cannot express; everything else is there.
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
