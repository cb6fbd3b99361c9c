"""Datasets: sources to prepare from, the prepared Zarr store, and torch Datasets over it."""

from pipeline.data import scenes, npy_folders, images  # noqa: F401, I001  (importing registers the sources, in this order)
from pipeline.data.sources import SOURCES

__all__ = ["SOURCES"]
