"""The one behaviour every typed config shares: built from a plain dict (a JSON file, safetensors metadata) with
unknown keys rejected by name, and written back to one."""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields
from typing import Any, TypeVar

__all__ = ["DictConfig"]

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """Mixin for dataclass configs: ``from_dict`` (unknown keys raise ``ValueError`` naming them; a nested config
    field, one whose default is a ``DictConfig``, is built from its dict the same way) and ``to_dict``."""

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s) {', '.join(unknown)}; "
                             f"accepted: {', '.join(sorted(known))}")
        values = dict(values)
        for f in fields(cls):
            if f.name in values and isinstance(values[f.name], dict) and f.default_factory is not MISSING:
                default = f.default_factory()
                if isinstance(default, DictConfig):
                    values[f.name] = type(default).from_dict(values[f.name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
