"""kdmtl's library: data, models, tasks, feature stores, training and evaluation.

It takes arrays, modules, stores and typed configs; it never reads params.yaml and never chooses
output paths (that is the job of `stages`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdmtl")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
