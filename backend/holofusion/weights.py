"""Weights on disk: safetensors only, with the model's config (JSON) in the file's metadata. Never pickle.

A weights file holds a flat ``{name: tensor}`` state dict; its metadata holds ``format`` ("holofusion"), ``kind``
(e.g. "holodiffusion"), ``config`` (JSON) and free-form ``info`` (JSON: step, data, ...). Optimizer state and RNG
states (training only) live beside it in a ``torch.save`` file that is read back with ``weights_only=True``.

A tensor may be stored in 8 bits (``quantize_int8``): ``name`` holds int8 values and ``name + INT8_SCALE`` one
float32 scale per output channel; ``load_weights`` turns the pair back into float32, so every reader sees plain
weights.
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

__all__ = ["save_weights", "load_weights", "read_metadata", "atomic_torch_save", "load_torch_state", "load_model",
           "quantize_int8", "INT8_SCALE"]

FORMAT = "holofusion"
INT8_SCALE = ":int8_scale"
"""Suffix of the per-output-channel scale of a tensor stored in 8 bits."""


def quantize_int8(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with its floating-point weights under ``prefix`` (convolution and linear kernels: two or more
    dimensions) in 8 bits, symmetric per output channel (scale = the channel's largest magnitude / 127), and the
    other floating-point tensors under ``prefix`` (biases, norms: few values, but every one matters) in float16.
    A quarter of float32's bytes for the kernels; the rounding is at most half a step, 0.4 % of the channel's
    largest weight. For weights whose exactness matters less than their size (an autoguidance model)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not (k.startswith(prefix) and v.is_floating_point()):
            out[k] = v
        elif v.dim() < 2:
            out[k] = v.half()
        else:
            w = v.detach().float()
            peak = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
            scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
            out[k] = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
            out[k + INT8_SCALE] = scale.flatten()
    return out


def _dequantize(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Float32 weights for the 8-bit pairs written by ``quantize_int8``; other tensors as they are. A scale without
    its tensor, or one that is not one value per output channel, is a ``UserError`` naming both."""
    out = {k: v for k, v in state.items() if not k.endswith(INT8_SCALE)}
    for k, scale in state.items():
        if k.endswith(INT8_SCALE):
            name = k[:-len(INT8_SCALE)]
            q = out.get(name)
            if q is None or q.dtype != torch.int8 or q.dim() < 1 or scale.numel() != q.shape[0]:
                raise UserError(f"{str(path)!r} is damaged: {k!r} is not one scale per output channel of an int8 "
                                f"tensor {name!r}")
            out[name] = q.float() * scale.float().view(-1, *([1] * (q.dim() - 1)))
    return out


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
    """(state dict, metadata) of a weights file; 8-bit tensors (``quantize_int8``) come back as float32."""
    meta = read_metadata(path)
    return _dequantize(load_file(str(path), device=str(device)), Path(path)), meta


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
