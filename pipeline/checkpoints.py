"""Checkpoints: weights plus a pydantic metadata record, loadable with `weights_only=True`."""

from pathlib import Path
from typing import TypeVar

import torch
from pydantic import BaseModel, ValidationError

from pipeline.errors import KdmtlError
from pipeline.files import write_atomically
from pipeline.models import Architecture, build_model
from schemas.checkpoint import ModelSpec, StudentMetadata, TeacherMetadata

M = TypeVar("M", bound=BaseModel)


def save_checkpoint(path: Path, model: torch.nn.Module, metadata: BaseModel) -> None:
    state = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata.model_dump(mode="json"),
    }
    write_atomically(path, lambda partial: torch.save(state, partial))


def load_checkpoint(path: Path, metadata_type: type[M]) -> tuple[dict[str, torch.Tensor], M]:
    """Weights and validated metadata; never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise KdmtlError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        metadata = metadata_type.model_validate(state["metadata"])
        return state["state_dict"], metadata
    except (RuntimeError, KeyError, TypeError, ValidationError, EOFError) as error:
        raise KdmtlError(
            f"{path} is not a kdmtl {metadata_type.__name__} checkpoint: {error}"
        ) from None


def build_from_spec(spec: ModelSpec) -> Architecture:
    return build_model(spec.arch, spec.filters, spec.heads)


def load_network(path: Path, metadata_type: type[M]) -> tuple[Architecture, M]:
    """A network in eval mode, and its metadata (which holds its `model` spec)."""
    state_dict, metadata = load_checkpoint(path, metadata_type)
    model = build_from_spec(metadata.model)
    model.load_state_dict(state_dict)
    return model.eval(), metadata


def load_teacher(path: Path) -> tuple[Architecture, TeacherMetadata]:
    """A teacher in eval mode (cached features must be deterministic), and its metadata."""
    return load_network(path, TeacherMetadata)


def load_student(path: Path) -> tuple[Architecture, StudentMetadata]:
    return load_network(path, StudentMetadata)
