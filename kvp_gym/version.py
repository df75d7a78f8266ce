"""The installed kvp-gym version, recorded in every results file, checkpoint and trace this package writes.

A room of its own so that modules stamping their output import one string, not the package root's environment
registration. Imports nothing from kvp_gym.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvp-gym")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
