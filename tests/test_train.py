"""Trainer features beyond the core step: branching a run from another run's autoencoder (--init-from)."""

import json
import shutil

import pytest
import safetensors.torch
import torch

from holofusion.data.synth import synthesize
from holofusion.errors import UserError
from holofusion.train import CHECKPOINT, LATENTS, TrainConfig, train_holodiffusion
from holofusion.weights import load_weights


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("initfrom")
    data = synthesize("apple", sequences=4, views=6, size=32, out=root / "data", workers=1, progress=False)
    run = root / "source"
    train_holodiffusion(str(data), "apple", "tiny", str(run), max_steps=31, progress=False)  # 30 AE steps + 1
    return data, run


def test_init_from_takes_the_autoencoder_and_latent_cache(source_run, tmp_path):
    data, src = source_run
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"base": "tiny", "model": {"unet": {"global_context": False, "base_channels": 8}}}))
    t = train_holodiffusion(str(data), "apple", str(cfg), str(tmp_path / "branch"), max_steps=32, progress=False,
                            init_from=str(src))
    assert t.step == 32  # started at the end of the autoencoder phase (30) and took two latent steps
    theirs, _ = load_weights(src / CHECKPOINT)
    ours, _ = load_weights(tmp_path / "branch" / CHECKPOINT)
    for k, v in theirs.items():
        if k.startswith(("encoder.", "decoder.")):
            assert torch.equal(v, ours[k]), k  # the latent phase does not train them
    assert (tmp_path / "branch" / LATENTS).read_bytes() == (src / LATENTS).read_bytes()
    assert ours["unet.conv_in.weight"].shape[0] == 8  # the new denoiser's own shape


def test_init_from_refuses_a_different_autoencoder(source_run, tmp_path):
    data, src = source_run
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"base": "tiny", "model": {"box_half_size": 2.0}}))
    with pytest.raises(UserError, match="box_half_size"):
        train_holodiffusion(str(data), "apple", str(cfg), str(tmp_path / "branch"), progress=False,
                            init_from=str(src))


def test_autoencoder_latent_noise_is_seeded_and_off_by_default(source_run):
    from holofusion.holodiffusion import load_holodiffusion
    from holofusion.train import Trainer, step_generator

    data, src = source_run
    t = Trainer(str(data), ["apple"], {}, str(src), resume=True, progress=False)
    images, cams, targets, _ = t.scene_batch(step_generator(0, 0, 0))
    m = load_holodiffusion(str(src))

    def loss(noise: float, seed: int) -> float:
        with torch.no_grad():
            return m.autoencoder_loss(images, cams, targets, None if noise == 0 else
                                      torch.Generator().manual_seed(seed), 0.1, noise)[0].item()

    clean = loss(0.0, 0)
    assert loss(0.3, 1) == loss(0.3, 1) != clean  # seeded, and it does change the grid that is rendered
    with pytest.raises(ValueError, match="generator"):
        m.autoencoder_loss(images, cams, targets, None, 0.1, 0.3)
    # The log carries how much the global code differs between the batch's objects (near 0: saturated).
    with torch.no_grad():
        stats = m.autoencoder_loss(images, cams, targets, None, 0.1)[1]
        g = m.config.encoder.global_slice()
        codes = m.encode(images, cams)[:, g, 0, 0, 0]
    assert images.shape[0] > 1 and g.stop > g.start
    assert stats["code_spread"] == pytest.approx(codes.std(0).mean().item(), rel=1e-5)

    # The global code's noise has its own std (ae_global_noise; None: the latent noise's).
    def loss_g(noise: float, global_noise: float | None) -> float:
        with torch.no_grad():
            return m.autoencoder_loss(images, cams, targets, torch.Generator().manual_seed(1), 0.1, noise,
                                      latent_l2=0.0, global_noise=global_noise)[0].item()

    assert loss_g(0.3, None) == loss_g(0.3, 0.3) == loss(0.3, 1) != loss_g(0.3, 0.0)
    assert loss_g(0.0, 0.5) != clean  # noise on the code alone
    assert TrainConfig().ae_global_noise is None
    assert TrainConfig.from_dict({"ae_global_noise": 0.0}).ae_global_noise == 0.0


def test_init_from_a_model_file_takes_every_weight_and_keeps_its_normalisation(source_run, tmp_path):
    data, src = source_run
    model_file = src / "model.safetensors"
    t = train_holodiffusion(str(data), "apple", "tiny", str(tmp_path / "cont"), max_steps=32, progress=False,
                            init_from=str(model_file))
    assert t.step == 32  # continued from the file's step 31 in the latent phase
    theirs, _ = load_weights(model_file)
    ours, _ = load_weights(tmp_path / "cont" / CHECKPOINT)
    for k in ("latent_mean", "latent_std", "encoder.proj.weight", "decoder.head.weight"):
        assert torch.equal(theirs[k], ours[k]), k
    assert not torch.equal(theirs["unet.conv_out.weight"], ours["unet.conv_out.weight"])  # it trained on
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"base": "tiny", "model": {"box_half_size": 2.0}}))
    with pytest.raises(UserError, match="other model settings.*box_half_size"):
        train_holodiffusion(str(data), "apple", str(cfg), str(tmp_path / "other"), progress=False,
                            init_from=str(model_file))


def test_init_from_a_model_file_may_change_the_noise_structure(source_run, tmp_path):
    """A continuation may diffuse with other noise (offset, multi-scale pyramid): the denoiser's weights fit any of
    them and adapt; the file it writes records the new structure, so sampling uses what it was trained with."""
    from holofusion.holodiffusion import load_holodiffusion

    data, src = source_run
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"base": "tiny", "model": {"pyramid_noise": 0.3, "pyramid_blocks": [2, 4]}}))
    t = train_holodiffusion(str(data), "apple", str(cfg), str(tmp_path / "pyr"), max_steps=32, progress=False,
                            init_from=str(src / "model.safetensors"))
    assert t.step == 32
    model = load_holodiffusion(str(tmp_path / "pyr" / "model.safetensors"))
    assert model.config.pyramid_noise == 0.3 and model.config.pyramid_blocks == (2, 4)
    assert load_holodiffusion(str(src / "model.safetensors")).config.pyramid_noise == 0.0


def test_resume_with_a_longer_schedule_and_refusal_to_move_a_crossed_boundary(source_run, tmp_path):
    data, src = source_run
    run = tmp_path / "copy"
    shutil.copytree(src, run)
    longer = tmp_path / "longer.json"
    longer.write_text(json.dumps({"base": "tiny", "train": {"latent_steps": 45}}))
    t = train_holodiffusion(str(data), "apple", str(longer), str(run), resume=True, max_steps=33, progress=False)
    assert t.step == 33 and t.cfg.latent_steps == 45 and t.cfg.total_steps == 30 + 45 + 10
    assert t.cfg.lr == TrainConfig.from_dict(t.config["train"]).lr
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps({"base": "tiny", "train": {"ae_steps": 40}}))
    with pytest.raises(UserError, match="cannot change ae_steps"):
        train_holodiffusion(str(data), "apple", str(moved), str(run), resume=True, progress=False)


def test_the_autoencoder_phase_ends_with_a_surface_calibration_that_branches_keep(source_run, tmp_path):
    """When the autoencoder is done the trainer measures its surface level on training objects and the model file
    carries it (a 30-step tiny autoencoder may have no surface yet: then the record says why and the default
    level stays); a run branched from it keeps the record, as its autoencoder is the same."""
    from holofusion.evaluate import OPACITY_LENGTHS, opacity_length_of
    from holofusion.weights import read_metadata

    data, src = source_run
    surface = read_metadata(src / "model.safetensors")["info"]["surface"]
    assert surface["step"] == 30
    if "failed" in surface:
        assert "surface" in surface["failed"]
    else:
        assert surface["opacity_length"] in OPACITY_LENGTHS and surface["split"] == "train"
    model = type("M", (), {"info": {"surface": surface}})()
    assert opacity_length_of(model) == surface.get("opacity_length", 1.0)
    train_holodiffusion(str(data), "apple", "tiny", str(tmp_path / "b"), max_steps=31, progress=False,
                        init_from=str(src))
    assert read_metadata(tmp_path / "b" / "model.safetensors")["info"]["surface"] == surface


def test_init_from_a_model_file_trains_its_autoencoder_on_when_the_config_asks(source_run, tmp_path):
    """A config whose autoencoder phase reaches past the file's step (31) continues that phase from the file's
    weights (here with the mask loss raised), then measures the latent normalisation and the surface level anew."""
    from holofusion.weights import read_metadata

    data, src = source_run
    model_file = src / "model.safetensors"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"base": "tiny", "train": {"ae_steps": 33, "mask_weight": 1.0,
                                                         "box_ray_fraction": 0.25}}))
    t = train_holodiffusion(str(data), "apple", str(cfg), str(tmp_path / "more"), max_steps=34, progress=False,
                            init_from=str(model_file))
    assert t.step == 34  # autoencoder steps 31 and 32, then one latent step
    theirs, _ = load_weights(model_file)
    ours, _ = load_weights(tmp_path / "more" / CHECKPOINT)
    assert not torch.equal(theirs["encoder.proj.weight"], ours["encoder.proj.weight"])  # the autoencoder trained
    assert not torch.equal(theirs["latent_mean"], ours["latent_mean"])  # a new encoder, a new normalisation
    assert read_metadata(tmp_path / "more" / "model.safetensors")["info"]["surface"]["step"] == 33


def test_box_rays_lie_in_the_grown_bounding_box_of_the_mask():
    from holofusion.train import box_pixels

    masks = torch.zeros(3, 40, 50, dtype=torch.bool)
    masks[0, 10:20, 5:25] = True  # 10 x 20 box: grown by 1 row and 2 columns on each side
    masks[1, 0:10, 40:50] = True  # at the corner: the grown box is clipped to the image
    gen = torch.Generator().manual_seed(0)
    pix = box_pixels(masks, 4000, gen)
    y, x = pix // 50, pix % 50
    assert y[0].min() == 9 and y[0].max() == 20 and x[0].min() == 3 and x[0].max() == 26
    assert y[1].min() == 0 and y[1].max() == 10 and x[1].min() == 39 and x[1].max() == 49
    assert y[2].min() == 0 and y[2].max() == 39 and x[2].min() == 0 and x[2].max() == 49  # empty: whole image
    # uniform over the box: each half of the first box gets about half of the rays
    assert abs(float((x[0] < 15).float().mean()) - 0.5) < 0.05


def test_init_from_a_model_file_may_change_the_noise_of_the_global_code(source_run, tmp_path):
    """A denoiser trained with voxel noise on the global code (older model files) continues with object noise."""
    from holofusion.weights import read_metadata

    data, src = source_run
    old = tmp_path / "voxel.json"
    old.write_text(json.dumps({"base": "tiny", "model": {"global_noise": "voxel"}}))
    train_holodiffusion(str(data), "apple", str(old), str(tmp_path / "v"), max_steps=32, progress=False,
                        init_from=str(src))
    assert read_metadata(tmp_path / "v" / "model.safetensors")["config"]["global_noise"] == "voxel"
    t = train_holodiffusion(str(data), "apple", "tiny", str(tmp_path / "o"), max_steps=33, progress=False,
                            init_from=str(tmp_path / "v" / "model.safetensors"))
    assert t.step == 33 and t.model.config.global_noise == "object"
    assert read_metadata(tmp_path / "o" / "model.safetensors")["config"]["global_noise"] == "object"


def test_latent_cooldown_decays_the_rate_linearly_to_zero_and_a_resume_may_add_it(source_run, tmp_path):
    """latent_cooldown_steps: the last N latent steps decay latent_lr linearly to zero; before them the rate is
    latent_lr (after the warm-up); a resumed run may add a cool-down to its schedule."""
    from holofusion.train import Trainer

    data, src = source_run
    run = tmp_path / "cool"
    shutil.copytree(src, run)
    cfg = tmp_path / "cool.json"
    cfg.write_text(json.dumps({"base": "tiny", "train": {"latent_steps": 20, "latent_cooldown_steps": 8}}))
    t = Trainer(str(data), ["apple"], json.loads(cfg.read_text()), str(run), resume=True, progress=False)
    assert t.cfg.latent_cooldown_steps == 8 and t.cfg.latent_steps == 20
    lr = t.cfg.latent_lr
    rates = {}
    for step in (35, 41, 42, 45, 49):  # the latent phase runs from step 30 to 49 (warm-up: 5 steps)
        t._set_lr("latent", step)
        rates[step] = t.opt.param_groups[1]["lr"]
    assert rates[35] == rates[41] == pytest.approx(lr)  # constant until 8 steps before the end (42)
    assert rates[42] == pytest.approx(lr * 8 / 8) and rates[45] == pytest.approx(lr * 5 / 8)
    assert rates[49] == pytest.approx(lr / 8)  # the last step still moves the weights
    assert t.opt.param_groups[0]["lr"] == 0  # the autoencoder stays frozen


def test_init_from_a_model_file_with_another_denoiser_trains_a_guide_on_its_latent_space(source_run, tmp_path):
    """Only the denoiser's settings changed: the file's autoencoder and normalisation are kept, the denoiser starts
    fresh in the latent phase, and the result can guide the file's model (autoguidance)."""
    from holofusion.holodiffusion import load_holodiffusion

    data, src = source_run
    model_file = src / "model.safetensors"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"base": "tiny", "model": {"unet": {"global_context": False, "base_channels": 8}}}))
    t = train_holodiffusion(str(data), "apple", str(cfg), str(tmp_path / "guide"), max_steps=32, progress=False,
                            init_from=str(model_file))
    assert t.step == 32  # from the end of the autoencoder phase (30): two latent steps, not the file's step 31 on
    theirs, _ = load_weights(model_file)
    ours, _ = load_weights(tmp_path / "guide" / CHECKPOINT)
    for k, v in theirs.items():
        if not k.startswith("unet."):
            assert torch.equal(v, ours[k]), k
    assert ours["unet.conv_in.weight"].shape[0] == 8
    assert json.loads((tmp_path / "guide" / "init_from.json").read_text())["weights"] == "autoencoder"
    model = load_holodiffusion(str(model_file))
    model.attach_guide(load_holodiffusion(str(tmp_path / "guide" / "model.safetensors")))
    assert model.sample([0], steps=3, autoguidance=2.0).shape == model.sample([0], steps=3).shape

    # `holofusion guide` puts it into a model folder (its denoiser's kernels in 8 bits), where it comes attached.
    from holofusion.cli import main

    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copyfile(model_file, folder / "holodiffusion.safetensors")
    assert main(["guide", "--model", str(folder), "--from", str(tmp_path / "guide")]) == 0
    raw = safetensors.torch.load_file(folder / "guide.safetensors")
    assert raw["unet.conv_in.weight"].dtype == torch.int8 and raw["unet.conv_in.bias"].dtype == torch.float16
    assert raw["latent_std"].dtype == torch.float32
    guided = load_holodiffusion(str(folder / "holodiffusion.safetensors"))
    assert guided.guide is not None and guided.guide.unet.conv_in.weight.dtype == torch.float32
    weights = load_holodiffusion(str(tmp_path / "guide" / "model.safetensors")).unet.conv_in.weight
    step = weights.abs().amax(dim=(1, 2, 3, 4), keepdim=True) / 127  # per output channel
    assert ((guided.guide.unet.conv_in.weight - weights).abs() <= step / 2 + 1e-7).all()
    assert not torch.equal(guided.sample([0], steps=3, autoguidance=2.0), guided.sample([0], steps=3))
    assert main(["guide", "--model", str(folder), "--from", str(tmp_path / "nowhere")]) == 2
    # `holofusion sample` takes the guide's own weight (2 unless `guide --weight` said otherwise), where the folder
    # has a guide, else none; the pipeline's presets take the same; a weight needs a guide.
    from holofusion.pipeline import HoloFusionPipeline

    def sampled_weight(model: str) -> float:
        assert main(["sample", "--model", model, "--steps", "2", "--size", "16", "--views", "1",
                     "--out", str(tmp_path / "s")]) == 0
        return load_weights(tmp_path / "s" / "apple_0.safetensors")[1]["info"]["autoguidance"]

    assert (sampled_weight(str(folder)), sampled_weight(str(model_file))) == (2.0, 1.0)
    assert main(["guide", "--model", str(folder), "--from", str(tmp_path / "guide"), "--weight", "3"]) == 0
    assert sampled_weight(str(folder)) == 3.0
    pipe = HoloFusionPipeline(load_holodiffusion(str(folder / "holodiffusion.safetensors")), None)
    assert (pipe.guidance_weight(None), pipe.guidance_weight(1.5)) == (3.0, 1.5)
    assert torch.equal(pipe.coarse(4, None, 2, None).features,
                       pipe.hd.to_grid(pipe.hd.denormalize(pipe.hd.sample([4], steps=2, autoguidance=3.0))).features)
    assert HoloFusionPipeline(load_holodiffusion(str(model_file)), None).guidance_weight(None) == 1.0
    assert main(["guide", "--model", str(folder), "--from", str(tmp_path / "guide"), "--weight", "0.5"]) == 2
    assert main(["sample", "--model", str(model_file), "--autoguidance", "2", "--out", str(tmp_path / "s")]) == 2
    assert main(["sample", "--model", str(folder), "--autoguidance", "0.5", "--out", str(tmp_path / "s")]) == 2
    assert main(["guide", "--model", str(tmp_path / "guide"), "--from", str(model_file)]) == 2  # not a model folder
    cfg.write_text(json.dumps({"base": "tiny", "model": {"box_half_size": 2.0, "unet": {"base_channels": 8}}}))
    with pytest.raises(UserError, match="other model settings.*box_half_size.*only the denoiser"):
        train_holodiffusion(str(data), "apple", str(cfg), str(tmp_path / "other"), progress=False,
                            init_from=str(model_file))
