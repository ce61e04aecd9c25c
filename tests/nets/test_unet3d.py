"""The 3D U-Net: shapes, conditioning, and the global-context path."""

import pytest
import torch

from holofusion.nets.unet3d import UNet3D, UNet3DConfig


def wake(m: UNet3D, skip=()) -> None:
    """Gives the zero-initialised layers (block outputs, attention outputs, conv_out) random weights, so every path
    of a fresh network shows in its output."""
    g = torch.Generator().manual_seed(1)
    for name, p in m.named_parameters():
        if not p.any() and not any(name.startswith(s) for s in skip):
            with torch.no_grad():
                p.normal_(0, 0.1, generator=g)


def make(**kw) -> UNet3D:
    torch.manual_seed(0)
    cfg = UNet3DConfig(**{"in_channels": 4, "grid_size": 8, "base_channels": 8, "channel_mults": (1, 2),
                          "attention_max_size": 4, **kw})
    return UNet3D(cfg)


def test_shapes_and_category_conditioning():
    m = make(num_classes=3)
    wake(m)
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 500])
    y = m(x, t, torch.tensor([0, 1]))
    assert y.shape == x.shape
    assert not torch.allclose(y, m(x, t, torch.tensor([2, 2])))
    assert torch.allclose(m(x, t), m(x, t, torch.tensor([3, 3])))  # no category = the "null" token


def test_global_context_starts_as_a_no_op_and_reads_the_whole_grid():
    plain, ctx = make(), make(global_context=True)
    wake(plain)
    missing, unexpected = ctx.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("global_mlp") for k in missing)
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([700, 700])
    assert torch.allclose(plain(x, t), ctx(x, t))  # zero-initialised: the same network at the start
    wake(ctx)  # now the global path is live
    x2 = x.clone()
    x2[1] = x[0] + 0.5  # object 1: object 0 with every channel's mean raised
    base = ctx(x, t)
    # The global statistics reach every voxel of every block: the response to a uniform shift differs from the
    # plain network's everywhere, not just near some voxels.
    diff = (ctx(x2, t)[1] - plain(x2, t)[1]).abs().flatten(1).mean(0)
    assert (diff > 1e-4).float().mean() > 0.99
    assert torch.isfinite(base).all()


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        UNet3DConfig(grid_size=10, channel_mults=(1, 2, 4))
    with pytest.raises(ValueError, match="unknown UNet3DConfig option"):
        UNet3DConfig.from_dict({"bogus": 1})
