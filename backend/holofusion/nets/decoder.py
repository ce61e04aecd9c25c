"""Per-sample decoder: grid features (+ view direction) -> density, colour and a feature vector.

Shape of the network (all ReLU, sizes from `DecoderConfig`):

    features (C) -> [Linear -> ReLU] x n_hidden_layers -> h
    h -> Linear -> [density_raw (1) | albedo_logit (3) | feature_out (F) | view_pre (V)]
    view branch (only when n_harmonics_dir > 0):
        ReLU(view_pre + Linear(gamma(direction))) -> Linear -> view_logit (3)
    rgb = sigmoid(albedo_logit + view_logit)

The direction enters only the small late view branch, which adds a residual to the colour logit. Two
view-independent colours come out of it:
- `albedo()` (or `forward` with `directions=None`): the colour head with the residual dropped, what the mesh baker
  and the evaluation use. It is the closer of the two to the data's unlit surface colour (on the shipped apple
  model, coloured COV 29.2 % and MMD 0.065 against 25.0 % and 0.072 for the other).
- `mean_colour()`: the rendered colour averaged over `ALBEDO_DIRECTIONS` directions spread over the sphere, what the
  renders show (the branch's ReLU layer and output bias give the residual a mean of its own, which training trades
  freely against the colour head: on the shipped apple model, renders of `albedo()` are 22.9 dB PSNR from the real
  renders, a 64^3 grid of `mean_colour()` 43 dB). Distillation starts from it, since it fits rendered views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configbase import DictConfig

__all__ = ["DecoderConfig", "Decoder", "DecoderOutput", "harmonic_embedding", "sphere_directions", "ALBEDO_DIRECTIONS"]


@dataclass
class DecoderConfig(DictConfig):
    """Sizes and initialisation of the decoder MLP."""

    n_features_in: int = 64
    """C: feature channels read from the voxel grid per sample."""
    hidden_dim: int = 64
    """Width of the shared trunk."""
    n_hidden_layers: int = 2
    """Number of Linear+ReLU layers in the trunk (>= 1)."""
    n_harmonics_dir: int = 4
    """L: frequencies 2^0..2^(L-1) of the unit view direction's harmonic embedding; 0 = no view dependence."""
    view_hidden_dim: int = 32
    """Width of the view-dependent colour branch (unused when n_harmonics_dir = 0)."""
    n_features_out: int = 0
    """F: length of the extra feature vector per sample (rendered for the super-resolution stage); 0 = none."""
    density_bias_init: float = -3.0
    """Initial bias of the raw density: softplus(-3) ~ 0.05 per world unit, so a fresh model is mostly transparent."""
    view_init_scale: float = 0.1
    """Scale on the initial weights of the view branch's output layer, so the first colours are near-albedo."""

    def __post_init__(self) -> None:
        for name in ("n_features_in", "hidden_dim", "n_hidden_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DecoderConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("n_harmonics_dir", "n_features_out"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"DecoderConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.n_harmonics_dir > 0 and self.view_hidden_dim < 1:
            raise ValueError(
                f"DecoderConfig.view_hidden_dim must be >= 1 with view dependence, got {self.view_hidden_dim}"
            )




class DecoderOutput(NamedTuple):
    """Decoder results for samples of leading shape (...)."""

    density_raw: Tensor
    """(...) density before the activation (see RenderConfig.density_activation)."""
    rgb: Tensor
    """(..., 3) colour in [0, 1]."""
    features: Tensor
    """(..., F) feature vector, F = n_features_out (may be 0)."""


def harmonic_embedding(x: Tensor, n_harmonics: int) -> Tensor:
    """NeRF positional encoding (Mildenhall et al. 2020, eq. 4) with the input kept:
    (..., D) -> (..., D * (1 + 2 * n_harmonics)) = [x, sin(2^k x_d), cos(2^k x_d)], each block ordered by input
    dimension d, then frequency k < n_harmonics."""
    if n_harmonics == 0:
        return x
    freqs = 2.0 ** torch.arange(n_harmonics, device=x.device, dtype=x.dtype)
    scaled = (x.unsqueeze(-1) * freqs).flatten(-2)  # (..., D * L)
    return torch.cat([x, scaled.sin(), scaled.cos()], dim=-1)


def _linear(n_in: int, n_out: int, generator: torch.Generator, scale: float = 1.0, bias: bool = True) -> nn.Linear:
    # skip_init keeps the global RNG untouched; the draw below is torch's default (Kaiming-uniform, a=sqrt(5))
    # bound 1/sqrt(fan_in), taken from the decoder's own generator.
    layer = torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias)
    bound = 1.0 / math.sqrt(n_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator).mul_(scale)
        if bias:
            layer.bias.uniform_(-bound, bound, generator=generator).mul_(scale)
    return layer


class Decoder(nn.Module):
    """Grid features and view direction -> (density_raw, rgb, features); see the module docstring for the layout."""

    def __init__(self, config: DecoderConfig, generator: torch.Generator | None = None) -> None:
        """`generator` draws the initial weights (CPU generator); None means a fresh one seeded with 0."""
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise ValueError(f"config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        c = config
        dims = [c.n_features_in] + [c.hidden_dim] * c.n_hidden_layers
        self.trunk = nn.ModuleList(_linear(a, b, gen) for a, b in zip(dims[:-1], dims[1:]))
        self.view_dependent = c.n_harmonics_dir > 0
        n_view = c.view_hidden_dim if self.view_dependent else 0
        # One matmul yields every head (density, albedo, features, view pre-activation): on a memory-bound CPU the
        # pass over the (N, hidden) activations costs more than the arithmetic.
        self.head = _linear(c.hidden_dim, 4 + c.n_features_out + n_view, gen)
        with torch.no_grad():
            self.head.bias[0] = c.density_bias_init
        self._split = (1, 3, c.n_features_out, n_view)
        if self.view_dependent:
            n_emb = 3 * (1 + 2 * c.n_harmonics_dir)
            self.view_dir = _linear(n_emb, n_view, gen, bias=False)
            self.view_out = _linear(n_view, 3, gen, scale=c.view_init_scale)

    def project(self, features: Tensor) -> Tensor:
        """(..., C) -> (..., hidden_dim): the first trunk layer's linear map without its bias.

        Being linear, it commutes with trilinear interpolation (whose weights need not sum to 1 near the box faces,
        hence no bias): the renderer projects the S^3 cells once and interpolates the projection, instead of
        running the layer on every sample. `decode_projected(project(f))` equals `forward(f)`.
        """
        return F.linear(features, self.trunk[0].weight)

    def decode_projected(self, projected: Tensor, directions: Tensor | None = None) -> DecoderOutput:
        """Like `forward`, from (..., hidden_dim) interpolated `project` outputs instead of (..., C) features."""
        return self.decode_hidden((projected + self.trunk[0].bias).relu_(), directions)

    def decode_hidden(self, hidden: Tensor, directions: Tensor | None = None) -> DecoderOutput:
        """Like `forward`, from the (..., hidden_dim) activations after the first layer, ReLU(project(f) +
        first_bias); the renderer computes those inside its grid lookup."""
        lead = hidden.shape[:-1]
        return self._decode(self._trunk_rest(hidden.reshape(-1, hidden.shape[-1])), lead, directions)

    @property
    def first_bias(self) -> Tensor:
        """(hidden_dim,) bias of the first trunk layer (see `project`)."""
        return self.trunk[0].bias

    def forward(self, features: Tensor, directions: Tensor | None = None) -> DecoderOutput:
        """Decode samples.

        features: (..., C) grid features per sample.
        directions: unit view directions broadcastable to (..., 3), e.g. (R, 1, 3) for features (R, S, C) so the
            embedding is computed once per ray; None = view-independent colour (the albedo).
        """
        if features.shape[-1] != self.config.n_features_in:
            raise ValueError(f"features must end in C={self.config.n_features_in}, got {tuple(features.shape)}")
        return self._decode(self._hidden(features), features.shape[:-1], directions)

    def _hidden(self, features: Tensor) -> Tensor:
        """(..., C) -> (M, hidden) trunk output, M = prod(...)."""
        # 2-D matmuls: F.linear on (R, S, C) returns a view, and an in-place ReLU on a view makes autograd rebuild
        # it element by element in the backward pass.
        first = self.trunk[0]
        h = F.linear(features.reshape(-1, features.shape[-1]), first.weight, first.bias).relu_()
        return self._trunk_rest(h)

    def _trunk_rest(self, h: Tensor) -> Tensor:
        for layer in self.trunk[1:]:
            # In place is safe: linear's backward needs its input and weight, not its output.
            h = F.linear(h, layer.weight, layer.bias).relu_()
        return h

    def _decode(self, h: Tensor, lead: torch.Size, directions: Tensor | None) -> DecoderOutput:
        """(M, hidden) trunk output -> heads, reshaped to the samples' leading shape `lead` (prod(lead) = M)."""
        out = self.head(h)
        density_raw, albedo_logit, feat, view_pre = out.split(self._split, dim=-1)
        logit = albedo_logit
        if self.view_dependent and directions is not None:
            emb = self.view_dir(harmonic_embedding(directions.to(h.dtype), self.config.n_harmonics_dir))
            # The direction term is (..., V) per ray; broadcast it over the samples of that ray.
            hidden = (view_pre.view(*lead, -1) + emb).relu_().view(-1, emb.shape[-1])
            logit = albedo_logit + self.view_out(hidden)
        # The renderer composites features with a batched matmul, whose CPU kernel loops per ray on strided input.
        feat = feat.contiguous().view(*lead, feat.shape[-1])
        return DecoderOutput(density_raw.reshape(lead), torch.sigmoid(logit).view(*lead, 3), feat)

    def albedo(self, features: Tensor) -> Tensor:
        """(..., C) -> (..., 3) view-independent colour in [0, 1] (the view branch's residual left out)."""
        return self(features, None).rgb

    def mean_colour(self, features: Tensor) -> Tensor:
        """(..., C) -> (..., 3) the rendered colour averaged over ``ALBEDO_DIRECTIONS`` fixed directions spread over
        the sphere (the albedo when the view branch is off)."""
        if not self.view_dependent:
            return self(features, None).rgb
        lead = features.shape[:-1]
        h = self._hidden(features)
        _, albedo_logit, _, view_pre = self.head(h).split(self._split, dim=-1)
        dirs = sphere_directions(ALBEDO_DIRECTIONS, h.device, h.dtype)
        emb = self.view_dir(harmonic_embedding(dirs, self.config.n_harmonics_dir))  # (D, V)
        rgb = torch.zeros_like(albedo_logit)
        for d in range(emb.shape[0]):  # one direction at a time: (M, V) at most, whatever M is
            rgb += torch.sigmoid(albedo_logit + self.view_out((view_pre + emb[d]).relu()))
        return (rgb / emb.shape[0]).view(*lead, 3)


ALBEDO_DIRECTIONS = 16
"""Directions `mean_colour` averages over (64 change it by under 1/2000 on the shipped apple model)."""


def sphere_directions(n: int, device=None, dtype=torch.float32) -> Tensor:
    """(n, 3) unit vectors spread evenly over the whole sphere (a Fibonacci lattice), the same every call."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    r = (1 - z * z).clamp_min(0).sqrt()
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1).to(device=device, dtype=dtype)
