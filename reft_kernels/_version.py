"""The package version (pyproject.toml's), in a module of its own so that every layer can read it without
importing the package's root, which imports every layer (reft_kernels/__init__.py re-exports it)."""
__version__ = "0.1.0"
