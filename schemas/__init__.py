"""Pydantic contracts of kdmtl: the params file, manifests, checkpoint metadata and metrics files.

This package imports nothing else of kdmtl, so every layer may depend on it.
"""
