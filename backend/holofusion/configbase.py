"""The one behaviour every typed config shares: built from a plain dict (a JSON file, safetensors metadata) with
unknown keys rejected by name, and written back to one."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

__all__ = ["DictConfig"]

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """Mixin for dataclass configs: ``from_dict`` (unknown keys raise ``ValueError`` naming them) and ``to_dict``."""

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s) {', '.join(unknown)}; "
                             f"accepted: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
