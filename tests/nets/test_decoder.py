"""Decoder MLP: shapes, the view-independent colour path, deterministic init, the projected fast path."""

from __future__ import annotations

import pytest
import torch

from holofusion.nets.decoder import ALBEDO_DIRECTIONS, Decoder, DecoderConfig, harmonic_embedding, sphere_directions


def small_config(**overrides) -> DecoderConfig:
    values = dict(n_features_in=6, hidden_dim=16, n_hidden_layers=2, n_harmonics_dir=2, view_hidden_dim=8,
                  n_features_out=4)
    values.update(overrides)
    return DecoderConfig(**values)


def unit_dirs(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, 3, generator=gen), dim=-1)


def test_output_shapes_and_ranges() -> None:
    gen = torch.Generator().manual_seed(0)
    dec = Decoder(small_config(), torch.Generator().manual_seed(1))
    feats = 3 * torch.randn(5, 7, 6, generator=gen)
    out = dec(feats, unit_dirs(gen, 5, 1))
    assert out.density_raw.shape == (5, 7)
    assert out.rgb.shape == (5, 7, 3) and out.features.shape == (5, 7, 4)
    assert torch.all((out.rgb >= 0) & (out.rgb <= 1))
    assert out.density_raw.min() < 0 < out.density_raw.max() or out.density_raw.abs().sum() > 0
    no_feats = Decoder(small_config(n_features_out=0))(feats, unit_dirs(gen, 5, 1))
    assert no_feats.features.shape == (5, 7, 0)


def test_albedo_drops_the_view_residual() -> None:
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(40, 6, generator=gen)
    dec = Decoder(small_config())
    torch.testing.assert_close(dec.albedo(feats), dec(feats, None).rgb)
    rgb1, rgb2 = dec(feats, unit_dirs(gen, 40)).rgb, dec(feats, unit_dirs(gen, 40)).rgb
    assert not torch.allclose(rgb1, rgb2)
    assert (rgb1 - dec.albedo(feats)).abs().max() < 0.1  # a small residual at init


def test_mean_colour_is_the_colour_averaged_over_directions() -> None:
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(40, 6, generator=gen)
    dec = Decoder(small_config())
    with torch.no_grad():  # a view branch whose residual has a mean of its own, as trained decoders' do
        dec.view_out.bias.fill_(0.8)
    a = dec.mean_colour(feats)
    dirs = sphere_directions(ALBEDO_DIRECTIONS)
    mean = torch.stack([dec(feats, d.expand(40, 3)).rgb for d in dirs]).mean(0)
    torch.testing.assert_close(a, mean, atol=1e-6, rtol=1e-5)
    # Dropping the residual would be a different colour: the bias alone moves it.
    assert (dec(feats, None).rgb - a).abs().max() > 0.05
    # The average does not depend on which direction set within reason: 4x more changes it by under 1/255.
    dense = torch.stack([dec(feats, d.expand(40, 3)).rgb for d in sphere_directions(4 * ALBEDO_DIRECTIONS)]).mean(0)
    assert (dense - a).abs().max() < 1 / 255
    # With no harmonics the colour is the albedo whatever the direction.
    flat = Decoder(small_config(n_harmonics_dir=0))
    torch.testing.assert_close(flat(feats, unit_dirs(gen, 40)).rgb, flat.albedo(feats))
    torch.testing.assert_close(flat.mean_colour(feats), flat.albedo(feats))


def test_sphere_directions_are_unit_and_spread() -> None:
    d = sphere_directions(64, dtype=torch.float64)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(64, dtype=torch.float64))
    assert d.mean(0).norm() < 0.02  # balanced over the sphere
    gap = (d @ d.T).fill_diagonal_(-1).max(1).values.acos().min()
    assert gap > 0.2  # no two nearly the same (0.45 rad is the mean spacing at 64)


def test_project_then_decode_equals_forward() -> None:
    gen = torch.Generator().manual_seed(3)
    dec = Decoder(small_config())
    feats = torch.randn(4, 9, 6, generator=gen)
    dirs = unit_dirs(gen, 4, 1)
    want = dec(feats, dirs)
    got = dec.decode_projected(dec.project(feats), dirs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = Decoder(small_config(), torch.Generator().manual_seed(7))
    b = Decoder(small_config(), torch.Generator().manual_seed(7))
    c = Decoder(small_config(), torch.Generator().manual_seed(8))
    d = Decoder(small_config())  # default generator: seed 0
    e = Decoder(small_config())
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb, pd, pe in zip(a.parameters(), b.parameters(), d.parameters(), e.parameters()):
        assert torch.equal(pa, pb) and torch.equal(pd, pe)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert a.head.bias[0].item() == pytest.approx(small_config().density_bias_init)


def test_gradients_reach_every_parameter() -> None:
    gen = torch.Generator().manual_seed(4)
    dec = Decoder(small_config())
    out = dec(torch.randn(3, 11, 6, generator=gen), unit_dirs(gen, 3, 1))
    (out.density_raw.square().sum() + out.rgb.square().sum() + out.features.square().sum()).backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_harmonic_embedding() -> None:
    x = torch.tensor([[0.5, -1.0, 2.0]])
    emb = harmonic_embedding(x, 3)
    assert emb.shape == (1, 3 * 7)
    torch.testing.assert_close(emb[0, :3], x[0])
    freqs = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(emb[0, 3:6], torch.sin(x[0, 0] * freqs))  # input dimension major, frequency minor
    torch.testing.assert_close(emb[0, 6:9], torch.sin(x[0, 1] * freqs))
    torch.testing.assert_close(emb[0, 12:15], torch.cos(x[0, 0] * freqs))
    assert torch.equal(harmonic_embedding(x, 0), x)


def test_config_validation_and_round_trip() -> None:
    cfg = small_config()
    assert DecoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DecoderConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError):
        DecoderConfig(hidden_dim=0)
    with pytest.raises(ValueError):
        DecoderConfig(n_features_out=-1)
    with pytest.raises(ValueError):
        Decoder(small_config())(torch.zeros(2, 5))  # wrong channel count
