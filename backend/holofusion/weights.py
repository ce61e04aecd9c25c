"""Weights on disk: safetensors only, with the model's config (JSON) in the file's metadata. Never pickle.

A weights file holds a flat ``{name: tensor}`` state dict; its metadata holds ``format`` ("holofusion"), ``kind``
(e.g. "holodiffusion"), ``config`` (JSON) and free-form ``info`` (JSON: step, data, ...). Optimizer state and RNG
states (training only) live beside it in a ``torch.save`` file that is read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import UserError

__all__ = ["save_weights", "load_weights", "read_metadata", "atomic_torch_save", "load_torch_state", "load_model"]

FORMAT = "holofusion"


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], kind: str, config: dict[str, Any],
                 info: dict[str, Any] | None = None) -> Path:
    """Writes ``state`` as safetensors with the config in the metadata; atomic (written beside, then renamed)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(config, sort_keys=True),
            "info": json.dumps(info or {}, sort_keys=True)}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``{"kind", "config", "info"}`` of a weights file; a clear ``UserError`` for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{str(path)!r} is not a safetensors weights file ({e}); HoloFusion reads .safetensors "
                        "only") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(f"{str(path)!r} is a safetensors file but not a HoloFusion model (no config in its metadata)")
    try:
        return {"kind": meta.get("kind"), "config": json.loads(meta["config"]),
                "info": json.loads(meta.get("info") or "{}")}
    except json.JSONDecodeError as e:
        raise UserError(f"{str(path)!r}: the config in its metadata is not valid JSON ({e})") from None


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor],
                                                                                        dict[str, Any]]:
    """(state dict, metadata) of a weights file."""
    meta = read_metadata(path)
    return load_file(str(path), device=str(device)), meta


def load_model(path: str | os.PathLike, kind: str, build: Any, device: str | torch.device = "cpu",
               what: str = "model") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Builds and loads a model of ``kind`` from a weights file or a run folder (its ``model.safetensors``).

    ``build(config_dict) -> nn.Module`` makes the (untrained) model from the stored config; ``what`` names the kind
    in messages ("a HoloDiffusion model"). Every failure is a one-sentence ``UserError``: a missing file, a file
    that is not safetensors, a model of another kind, a stored config that is not valid, weights that do not fit.
    Returns the model (on ``device``, in eval mode) and the file's metadata.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    state, meta = load_weights(p, device)
    if meta["kind"] != kind:
        raise UserError(f"{str(p)!r} holds a {meta['kind']!r} model, not {what}")
    try:
        model = build(meta["config"]).to(device)
    except (TypeError, ValueError) as e:
        raise UserError(f"{str(p)!r}: its stored config is not valid ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise UserError(f"{str(p)!r}: its weights do not fit its stored config "
                        f"({(lines[1] if len(lines) > 1 else lines[0]).strip()})") from None
    return model.eval(), meta


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of plain tensors / numbers / strings (loadable with ``weights_only=True``), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torch_state(path: str | os.PathLike) -> Any:
    """Reads a file written by ``atomic_torch_save``; never unpickles arbitrary objects (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupted or foreign file: say which
        raise UserError(f"cannot read training state {str(path)!r}: {e}") from None
