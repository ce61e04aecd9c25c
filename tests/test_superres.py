"""The super-resolution model and its trainer on tiny models: the loss falls, pairs come from the HoloDiffusion model's
own renders, resume is exact, sampling is seeded per view, SDEdit keeps what low noise does not hide, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from holofusion.configs import SUPERRES_BUILTIN, resolve_config
from holofusion.errors import UserError
from holofusion.superres import Condition, SuperRes, SuperResConfig, load_superres
from holofusion.train_superres import PAIRS, SuperResTrainer, train_superres
from holofusion.weights import load_weights


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**train) -> dict:
    cfg = resolve_config("tiny", builtins=SUPERRES_BUILTIN)
    cfg["train"].update(train)
    return cfg


def _fixed_loss(trainer: SuperResTrainer, model: SuperRes) -> float:
    """The v-loss on every cached pair at 8 fixed noise draws: a steady yardstick (a step's own loss is noisy)."""
    p = trainer.pairs
    cond = Condition(p["rgb"], p["alpha"], p.get("features"))
    with torch.no_grad():
        return sum(model.loss(p["target"], cond, torch.Generator().manual_seed(s))[0].item() for s in range(8)) / 8


def test_loss_falls(tiny_models, tmp_path):
    tr = SuperResTrainer(str(tiny_models["holodiffusion"]), tiny_models["data"], tiny_config(steps=120), tmp_path / "r",
                         progress=False)
    tr.build_pairs()
    before = _fixed_loss(tr, tr.model)
    tr.fit()
    after = _fixed_loss(tr, tr.model)
    assert after < 0.7 * before, f"super-resolution loss did not fall: {before:.4f} -> {after:.4f}"


def test_training_on_crops_lowers_the_loss_on_whole_views(tiny_models, tmp_path):
    """``crop``: each step sees one window per pair; the convolutional U-Net still gets better on whole views."""
    tr = SuperResTrainer(str(tiny_models["holodiffusion"]), tiny_models["data"], tiny_config(steps=120, crop=8),
                         tmp_path / "r", progress=False)
    tr.build_pairs()
    before = _fixed_loss(tr, tr.model)
    tr.fit()
    after = _fixed_loss(tr, tr.model)
    assert after < 0.7 * before, f"super-resolution loss on whole views did not fall: {before:.4f} -> {after:.4f}"
    cond = Condition(tr.pairs["rgb"][:2], tr.pairs["alpha"][:2])
    assert tr.model.sample(cond, seeds=[0, 1], steps=2).shape[-2:] == (16, 16)  # whole views
    with pytest.raises(UserError, match="crop 7 must be a multiple of 2"):
        SuperResTrainer(str(tiny_models["holodiffusion"]), tiny_models["data"], tiny_config(crop=7), tmp_path / "b",
                        progress=False)


def test_pairs_are_renders_of_the_holodiffusion_model_against_real_images(tiny_models):
    from holofusion.holodiffusion import load_holodiffusion

    state, _ = load_weights(tiny_models["superres"] / PAIRS)
    cfg = SuperResConfig.from_dict(tiny_config()["model"])
    n = state["rgb"].shape[0]
    assert n == 4 * 2  # 4 training objects (the set's train split) x cache_views 2
    assert state["rgb"].shape == (n, 3, cfg.low_size, cfg.low_size)
    assert state["target"].shape == (n, 3, cfg.high_size, cfg.high_size)
    # The condition is the coarse model's render, not a downsampled photograph: it differs from the target's
    # downsampling by far more than resampling error, and it is not blank.
    small = torch.nn.functional.interpolate(state["target"], size=cfg.low_size, mode="area")
    assert float((small - state["rgb"]).abs().mean()) > 0.02
    assert float(state["alpha"].mean()) > 0.02
    hd = load_holodiffusion(str(tiny_models["holodiffusion"]))
    assert float(state["residual_scale"]) > 1.0  # residuals are smaller than images: scaled up to unit spread
    assert hd.config.decoder.n_features_out == 0 and "features" not in state


def test_resume_takes_exactly_the_uninterrupted_steps(tiny_models, tmp_path):
    hd, data = str(tiny_models["holodiffusion"]), tiny_models["data"]
    cfg = tiny_config(steps=12, checkpoint_every=6)
    full = SuperResTrainer(hd, data, cfg, tmp_path / "full", progress=False)
    full.fit()
    part = SuperResTrainer(hd, data, cfg, tmp_path / "part", progress=False)
    part.fit(max_steps=6)
    resumed = SuperResTrainer(hd, data, {}, tmp_path / "part", resume=True, progress=False)
    assert resumed.step == 6
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, y in zip(full.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(x, y)


def test_init_from_continues_a_model_with_its_weights_and_step_count(tiny_models, tmp_path):
    hd, data = str(tiny_models["holodiffusion"]), tiny_models["data"]
    first = SuperResTrainer(hd, data, tiny_config(steps=6), tmp_path / "first", progress=False)
    first.fit()
    weights = tmp_path / "first" / "model.safetensors"
    more = SuperResTrainer(hd, data, tiny_config(steps=10), tmp_path / "more", progress=False, init_from=str(weights))
    assert more.step == 6
    for x, y in zip(first.ema.parameters(), more.model.unet.parameters()):
        assert torch.equal(x, y)  # the file's EMA weights are where the new run starts
    start = [p.clone() for p in more.model.unet.parameters()]
    more.fit()
    assert more.step == 10 and any(not torch.equal(a, b) for a, b in zip(start, more.model.unet.parameters()))
    _, info = load_superres(str(tmp_path / "more"))
    assert info["step"] == 10 and info["init_from"] == {"source": str(weights), "step": 6}
    # a model already trained as far as the config goes, or a model of other settings: a clear refusal
    with pytest.raises(UserError, match="trained for 6 steps"):
        SuperResTrainer(hd, data, tiny_config(steps=6), tmp_path / "same", progress=False, init_from=str(weights))
    other = tiny_config(steps=10)
    other["model"]["block_channels"] = [8, 16]
    with pytest.raises(UserError, match="other model settings"):
        SuperResTrainer(hd, data, other, tmp_path / "other", progress=False, init_from=str(weights))
    with pytest.raises(UserError, match="not a super-resolution model"):
        SuperResTrainer(hd, data, tiny_config(steps=10), tmp_path / "hd", progress=False, init_from=hd)


def test_sampling_is_seeded_per_view(tiny_models):
    model, info = load_superres(str(tiny_models["superres"]))
    assert info["holodiffusion"] == str(tiny_models["holodiffusion"])
    state, _ = load_weights(tiny_models["superres"] / PAIRS)
    cond = Condition(state["rgb"][:3], state["alpha"][:3])
    a = model.sample(cond, [5, 6, 7], steps=4)
    assert a.shape == (3, 3, 16, 16) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(model.sample(cond, [5, 6, 7], steps=4), a)
    # view 1 alone, with the same seed, is the same image: nothing depends on what else is in the batch
    one = model.sample(Condition(cond.rgb[1:2], cond.alpha[1:2]), [6], steps=4)
    torch.testing.assert_close(one[0], a[1], atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.sample(cond, [8, 6, 7], steps=4)[0], a[0])


def test_sdedit_keeps_more_of_the_init_at_low_strength(tiny_models):
    model, _ = load_superres(str(tiny_models["superres"]))
    state, _ = load_weights(tiny_models["superres"] / PAIRS)
    cond = Condition(state["rgb"][:4], state["alpha"][:4])
    init = state["target"][:4].flip(-1)  # an image the model would not draw on its own
    dist = {}
    for strength in (0.1, 0.9):
        out = model.sample(cond, [1, 2, 3, 4], steps=6, init=init, strength=strength)
        dist[strength] = float((out - init).abs().mean())
    assert dist[0.1] < dist[0.9]
    with pytest.raises(ValueError, match="strength"):
        model.sample(cond, [1, 2, 3, 4], init=init, strength=0.0)


def test_bad_input_is_one_line_and_exit_2(tiny_models, tmp_path):
    not_weights = tmp_path / "m.safetensors"
    not_weights.write_text("hello")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "holofusion.cli", "train", "superres", *args],
                              capture_output=True, text=True, timeout=120)

    cases = {
        "not safetensors": ["--holodiffusion", str(not_weights), "--data", str(tiny_models["data"]),
                            "--out", str(tmp_path / "a")],
        "a superres model": ["--holodiffusion", str(tiny_models["superres"]), "--data", str(tiny_models["data"]),
                             "--out", str(tmp_path / "b")],
        "no data": ["--holodiffusion", str(tiny_models["holodiffusion"]), "--data", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "c")],
        "unknown config": ["--holodiffusion", str(tiny_models["holodiffusion"]), "--data", str(tiny_models["data"]),
                           "--config", "huge", "--out", str(tmp_path / "d")],
    }
    for name, args in cases.items():
        r = run(*args)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
    with pytest.raises(UserError, match="already exists"):
        train_superres(str(tiny_models["holodiffusion"]), str(tiny_models["data"]), "tiny",
                       str(tiny_models["superres"]), progress=False)

