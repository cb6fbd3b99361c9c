"""Registries of small classes: kdmtl's extension points (tasks, data sources, methods, ...)."""

from collections.abc import Iterator
from typing import Generic, TypeVar

from pipeline.errors import KdmtlError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a class that declares it as its `name` attribute."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = cls.name  # type: ignore[attr-defined]
        if name in self._classes:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._classes[name] = cls
        return cls

    def __getitem__(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise KdmtlError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self._classes)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def names(self) -> list[str]:
        return list(self._classes)
