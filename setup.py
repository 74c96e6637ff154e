"""Build script. Metadata lives in pyproject.toml; this file exists for the C++/CUDA extensions in
csrc/ (none are built yet: every op runs through Triton or the PyTorch reference)."""
from setuptools import setup

setup()
