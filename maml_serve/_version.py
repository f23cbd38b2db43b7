"""The installed distribution's version (read from its metadata: no heavy imports)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("maml-serve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
