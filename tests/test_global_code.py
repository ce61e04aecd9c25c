"""The per-object global code: constant over the grid in the encoder's grids, in the autoencoder's noisy grids, in
every denoised estimate and in every sample; and it carries what differs between objects (their colour)."""

from __future__ import annotations

import pytest
import torch

from holofusion.cameras import PerspectiveCamera, fly_around_cameras
from holofusion.configs import resolve_config
from holofusion.holodiffusion import HoloDiffusion, HoloDiffusionConfig
from holofusion.nets.encoder import EncoderConfig


def _model(seed: int = 0) -> HoloDiffusion:
    model = HoloDiffusion(HoloDiffusionConfig.from_dict(resolve_config("tiny", ["apple"])["model"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the zero-initialised output layers, so the denoiser is not trivially constant
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _views(colour: tuple[float, float, float], n: int = 3):
    """n views of a flat-coloured disc on white, with turntable cameras."""
    cams = fly_around_cameras(n, distance=9.0, elevation_deg=20.0, focal_length=2.0, image_size_hw=(32, 32))
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 8 ** 2).float()
    img = torch.ones(n, 3, 32, 32)
    img = img * (1 - disc) + torch.tensor(colour).view(1, 3, 1, 1) * disc
    return img, cams


def _spread_over_grid(x: torch.Tensor) -> torch.Tensor:
    return (x.flatten(2).max(-1).values - x.flatten(2).min(-1).values).max()


def test_encoder_global_channels_are_constant_and_depend_on_the_object():
    model = _model()
    g = model.config.encoder.global_slice()
    assert (g.start, g.stop) == (3, 5)  # tiny: 3 local, 2 global, 3 raw colour
    red, cams = _views((0.8, 0.1, 0.1))
    green, _ = _views((0.2, 0.7, 0.1))
    with torch.no_grad():
        z = model.encode(torch.stack([red, green]), PerspectiveCamera.stack([cams, cams]))
    assert z.shape == (2, 8, 8, 8, 8)
    assert float(_spread_over_grid(z[:, g])) == 0.0
    assert float((z[0, g, 0, 0, 0] - z[1, g, 0, 0, 0]).abs().max()) > 1e-3
    assert float(_spread_over_grid(z[:, :3])) > 1e-3  # the local channels do vary


def test_denoised_estimates_and_samples_keep_the_code_constant():
    model = _model()
    g = model.config.encoder.global_slice()
    x_t = torch.randn(2, 8, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x0 = model.denoise(x_t, torch.tensor([200, 800]))
        raw = model.schedule.x0_from_v(x_t, torch.tensor([200, 800]), model.unet(x_t, torch.tensor([200, 800])))
    assert float(_spread_over_grid(raw[:, g])) > 1e-3  # the U-Net alone does not keep it constant ...
    assert float(_spread_over_grid(x0[:, g])) < 1e-6  # ... the projection does, to its mean
    torch.testing.assert_close(x0[:, g, 0, 0, 0], raw[:, g].mean(dim=(2, 3, 4)))
    torch.testing.assert_close(x0[:, :g.start], raw[:, :g.start])
    torch.testing.assert_close(x0[:, g.stop:], raw[:, g.stop:])
    for sampler in ("dpm++", "ddim"):
        x = model.sample([1, 2], steps=4, sampler=sampler)
        assert float(_spread_over_grid(x[:, g])) < 1e-5, sampler


def test_autoencoder_noise_is_one_draw_per_object_on_the_code():
    model = _model()
    g = model.config.encoder.global_slice()
    seen = {}
    model.photometric_loss = lambda z, *a, **k: (seen.setdefault("z", z), (z.sum() * 0, {}))[1]
    red, cams = _views((0.8, 0.1, 0.1))
    model.autoencoder_loss(red[None], cams, None, torch.Generator().manual_seed(0), latent_noise=0.2)
    z = seen["z"].detach()
    assert float(_spread_over_grid(z[:, g])) < 1e-6
    with torch.no_grad():
        clean = model.encode(red[None], cams)
    assert float((z[:, g] - clean[:, g]).abs().max()) > 1e-3  # noised, as one value per channel
    assert float(_spread_over_grid((z - clean)[:, :g.start])) > 0.1  # the local channels get voxel noise


@pytest.mark.parametrize("channels, raw, glob", [(5, 3, 2), (3, 0, 3), (4, 3, -1)])
def test_channel_budget_is_checked(channels, raw, glob):
    with pytest.raises(ValueError, match="global_channels"):
        EncoderConfig(channels=channels, raw_color_channels=raw, global_channels=glob)


def test_colour_noise_hits_the_raw_colour_channels_only():
    model = _model()
    seen = {}
    model.photometric_loss = lambda z, *a, **k: (seen.setdefault("z", z.detach()), (z.sum() * 0, {}))[1]
    red, cams = _views((0.8, 0.1, 0.1))
    model.autoencoder_loss(red[None], cams, None, torch.Generator().manual_seed(0), latent_noise=0.05,
                           colour_noise=0.5)
    with torch.no_grad():
        delta = seen["z"] - model.encode(red[None], cams)
    local, colour = delta[:, :3].std(), delta[:, -3:].std()
    assert 0.03 < float(local) < 0.07 and 0.4 < float(colour) < 0.6
