"""HoloFusionPipeline (public): seed (+ category, preset) -> coarse grid, super-resolved views, distilled grid.

    pipe = HoloFusionPipeline.from_pretrained("apple", device="cpu")     # a name under models/ or a folder
    out = pipe(seed=7, preset="standard", callback=None)
    out.coarse, out.views, out.distilled                                  # see PipelineOutput

Stages (HoloFusion, Karnewar et al. 2023):
1. ``coarse``: HoloDiffusion samples a feature grid from the seed's noise (few-step DPM-Solver++).
2. ``superres``: K views of it around a band of the sphere, framed the way the training images were cropped (the
   object's silhouette box plus 30 % context, so the super-resolution model sees what it learned on), are rendered
   at low resolution and super-resolved, each view with its own seeded generator.
3. ``distill``: the views are distilled into one explicit high-resolution grid (``distill.py``): their colours
   baked into the grid, then a patch-wise fit of density and colour to all of them.

Presets: ``draft`` stops after stage 1 (seconds); ``standard`` runs all three; ``high`` uses more views, a finer
grid and more iterations, and the folder's 4x super-resolution model (``superres_high.safetensors``) where it has
one. The callback gets ``(stage, step, total, preview)`` (preview an (H, W, 3) image in [0, 1]
or None) after every step of every stage and stops the run by returning False (``PipelineCancelled``). Every random
draw comes from generators seeded by the seed: the same model, seed and preset give the same object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .cameras import PerspectiveCamera
from .colour import ColourMap, colour_map_of, map_decoder, map_explicit_grid
from .data.co3d import mask_crop_box
from .diffusion import SamplingCancelled
from .distill import DistillCancelled, DistillConfig, ExplicitField, distill, start_grid, view_cameras
from .errors import UserError
from .evaluate import density_level, opacity_length_of
from .frame import cameras_in_frame, frame_of, place_in_frame, surface_frame
from .grid import VoxelGrid
from .holodiffusion import HoloDiffusion, load_holodiffusion
from .server.protocol import MAX_SEED
from .superres import Condition, SuperRes, load_superres

__all__ = ["HoloFusionPipeline", "PipelineOutput", "PipelineCancelled", "Preset", "PRESETS", "MODELS_DIR"]

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
"""The shipped models: ``models/<name>/holodiffusion.safetensors`` (+ ``superres.safetensors``, and optionally
``superres_high.safetensors``, the ``high`` preset's larger-factor super-resolution model)."""

PipelineCallback = Callable[[str, int, int, "Tensor | None"], "bool | None"]


class PipelineCancelled(RuntimeError):
    """The callback returned False; ``stage`` says where the run stopped."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class Preset:
    """How much work one object gets."""

    coarse_steps: int = 25
    """HoloDiffusion sampler steps."""
    autoguidance: float | None = None
    """Weight w of the model folder's guide, where it has one (``HoloDiffusion.attach_guide``); None: the guide's
    own weight (``HoloDiffusion.guide_weight``, measured per model); 1 leaves it out."""
    superres: bool = True
    """Run stages 2 and 3 (False: the ``draft`` preset)."""
    views: int = 16
    """K, views super-resolved and distilled."""
    sr_steps: int = 10
    """Super-resolution sampler steps per view."""
    sr_strength: float = 1.0
    """The views start from the upsampled coarse render noised to this fraction of T (SDEdit) rather than from pure
    noise (1.0): lower keeps more of the coarse object and leaves the views less to disagree on."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    view_distance: float = 9.0
    """Camera distance of the K views (world units); the framing comes from the object's silhouette."""
    elevation_deg: tuple[float, float] = (-5.0, 50.0)
    """The band of the sphere the views cover (the training views' elevations)."""
    sr_model: str = "superres"
    """Which of the folder's super-resolution models draws the views: "superres", or "superres_high" (its
    larger-factor model, ``superres_high.safetensors``, where the folder has one; else "superres")."""

    def __post_init__(self) -> None:
        if self.sr_model not in ("superres", "superres_high"):
            raise ValueError(f"sr_model must be 'superres' or 'superres_high'; got {self.sr_model!r}")


# The fit settings of ``standard`` were chosen on held-out apples (benchmarks/eval_stages.py, seeds 1000-1003):
# no re-sampling rounds and TV 0.01 matched or beat the defaults of DistillConfig on agreement with held-out
# super-resolved views at a third of the time (33-62 s against 143-146 s on one CPU thread); starting the colour
# from the views baked into the grid (colour_init "views") rather than from the coarse colour is what first made
# the distilled renders agree with held-out views better than the coarse renders do (README, "HoloFusion").
_FIT = dict(resample_every=0, tv_weight=0.01, colour_init="views")
# ``high`` starts from a sharpened grid (the coarse surface with a crisp rim, ``DistillConfig.sharpen``) under a
# tenth of the density TV, which would otherwise smooth the rim back into the coarse fog, and keeps the colour's TV;
# with a folder's 4x super-resolution model (128 px views) that made the distilled renders both sharper and more
# consistent with held-out views than the standard fit's (README, "HoloFusion").
_SHARP = dict(_FIT, tv_weight=0.001, tv_colour_weight=0.01, sharpen=2.0)
PRESETS: dict[str, Preset] = {
    "draft": Preset(superres=False),
    "standard": Preset(distill=DistillConfig(**_FIT)),
    "high": Preset(coarse_steps=50, views=32, sr_steps=20, sr_model="superres_high",
                   distill=DistillConfig(resolution=96, iterations=600, patches=16, **_SHARP)),
}


@dataclass
class PipelineOutput:
    """One generated object.

    coarse: (1, C, S, S, S) HoloDiffusion grid in encoder space, rendered by ``coarse_decoder``.
    views: (K, 3, H, W) super-resolved views in [0, 1] (before distillation), or None (draft).
    cameras: the K views' cameras (H x W), or None.
    distilled: (1, 4, R, R, R) explicit grid (raw density, colour logits), rendered by ``ExplicitField``, or None.
    """

    seed: int
    category: str | None
    preset: str
    coarse: VoxelGrid
    coarse_decoder: torch.nn.Module
    views: Tensor | None = None
    cameras: PerspectiveCamera | None = None
    distilled: VoxelGrid | None = None
    distill_iterations: int = 0

    def field(self) -> tuple[VoxelGrid, torch.nn.Module]:
        """(grid, decoder) of the most detailed stage that ran: what the mesh is extracted from."""
        if self.distilled is not None:
            return self.distilled, ExplicitField()
        return self.coarse, self.coarse_decoder


def model_folders(root: Path = MODELS_DIR) -> list[Path]:
    """The shipped models: folders under ``root`` holding ``holodiffusion.safetensors``, by name
    (``models/training`` holds runs to continue, not models)."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if (d / "holodiffusion.safetensors").is_file())


class HoloFusionPipeline:
    """The three stages of HoloFusion around a trained HoloDiffusion model and (optionally) its super-resolution
    model. Without one, only the ``draft`` preset runs."""

    def __init__(self, holodiffusion: HoloDiffusion, superres: SuperRes | None = None, name: str = "",
                 superres_high: SuperRes | None = None):
        self.hd = holodiffusion.eval()
        self.sr = superres.eval() if superres is not None else None
        self.sr_high = superres_high.eval() if superres_high is not None else None
        self.name = name
        self._sr_digests: dict[int, str] = {}  # id(super-resolution model) -> weights digest (``colour_map``)
        self._mapped: tuple[ColourMap, torch.nn.Module] | None = None  # (draft map, decoder with it folded in)

    def sr_for(self, preset: Preset) -> SuperRes | None:
        """The super-resolution model ``preset`` draws its views with (``Preset.sr_model``)."""
        if preset.sr_model == "superres_high" and self.sr_high is not None:
            return self.sr_high
        return self.sr

    def guidance_weight(self, autoguidance: float | None) -> float:
        """The autoguidance weight stage 1 samples with: 1 without a guide, else ``autoguidance`` (a preset's) or,
        where that is None, the guide's own (``HoloDiffusion.guide_weight``)."""
        if self.hd.guide is None:
            return 1.0
        return float(autoguidance) if autoguidance is not None else self.hd.guide_weight

    @property
    def device(self) -> torch.device:
        return self.hd.device

    @property
    def categories(self) -> list[str]:
        return list(self.hd.config.categories)

    def opacity_length(self, override: float | None = None) -> float:
        """The surface level meshes are cut at: ``override`` when given, else the HoloDiffusion model's calibrated
        level (``holofusion calibrate``). The distilled grid starts from the coarse field's density and is fitted to
        views of it, so the coarse model's level serves it too."""
        return float(override) if override is not None else opacity_length_of(self.hd)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu") -> HoloFusionPipeline:
        """A shipped model by name (a folder under ``models/``) or any folder holding ``holodiffusion.safetensors``
        and optionally ``superres.safetensors`` (or HoloDiffusion / super-resolution run folders' ``model.safetensors``
        under ``holodiffusion/`` and ``superres/``)."""
        p = Path(name_or_path)
        if not p.exists() and (MODELS_DIR / name_or_path).is_dir():
            p = MODELS_DIR / name_or_path
        if not p.is_dir():
            known = [d.name for d in model_folders()]
            raise UserError(f"model {name_or_path!r} is neither a folder nor a shipped model "
                            f"({', '.join(known) or 'none shipped'})")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device}: CUDA is not available on this machine; use cpu")

        def find(stem: str) -> Path | None:
            for cand in (p / f"{stem}.safetensors", p / stem / "model.safetensors"):
                if cand.is_file():
                    return cand
            return None

        hd_path = find("holodiffusion")
        if hd_path is None:
            raise UserError(f"{str(p)!r} holds no holodiffusion.safetensors (nor holodiffusion/model.safetensors)")
        hd = load_holodiffusion(str(hd_path), device)
        srs = {}
        for stem in ("superres", "superres_high"):
            sr_path = find(stem)
            sr = load_superres(str(sr_path), device)[0] if sr_path is not None else None
            if sr is not None and sr.config.cond_features != hd.config.decoder.n_features_out:
                raise UserError(f"{str(sr_path)!r} expects {sr.config.cond_features} rendered feature channels; "
                                f"the HoloDiffusion model renders {hd.config.decoder.n_features_out}")
            srs[stem] = sr
        if srs["superres"] is None and srs["superres_high"] is not None:
            raise UserError(f"{str(p)!r} holds superres_high.safetensors but no superres.safetensors, which the "
                            "standard preset needs")
        return cls(hd, srs["superres"], p.name, srs["superres_high"])

    # ------------------------------------------------------------------ stages
    def __call__(self, seed: int, category: str | None = None, preset: str | Preset = "standard",
                 callback: PipelineCallback | None = None, autoguidance: float | None = None) -> PipelineOutput:
        """One object. ``autoguidance`` overrides the preset's guide weight and keeps its name, so the preset's
        colour map still applies (a ``Preset`` given as such is a custom one, with no map)."""
        name, pre = self._preset(preset)
        if autoguidance is not None:
            pre = replace(pre, autoguidance=autoguidance)
        if category is not None and category not in self.categories:
            raise UserError(f"category {category!r} is not one this model knows ({', '.join(self.categories)})")
        if pre.superres and self.sr is None:
            raise UserError(f"preset {name!r} needs a super-resolution model, and {self.name or 'this model'} has "
                            "none; use preset 'draft'")
        seed = int(seed)
        if not 0 <= seed <= MAX_SEED:  # the server's range, so a seed names the same object on every route
            raise UserError(f"seed {seed} is out of range: seeds are whole numbers from 0 to {MAX_SEED}")
        coarse = self.coarse(seed, category, pre.coarse_steps, callback, pre.autoguidance)
        # The coarse field is shown in the draft preset's calibrated colours (``colour.py``); the stages below read
        # the uncalibrated ones, which their models were trained on.
        out = PipelineOutput(seed, category, name, coarse, self.coarse_decoder())
        if pre.superres:
            out.cameras, out.views, distilled, out.distill_iterations = self.refine(coarse, seed, pre, callback)
            cmap = self.colour_map(name, pre)
            out.distilled = distilled if cmap is None else map_explicit_grid(distilled, cmap)
        return self.in_frame(out)

    def in_frame(self, out: PipelineOutput) -> PipelineOutput:
        """``out`` placed in the frame the model's training objects share, where it has one (``frame.py``): the
        final field's surface centred on it (and scaled to its spread where the frame says so), the coarse grid and
        the view cameras moved with it, so the stages stay aligned. Measured at the model's own surface level,
        whatever level a mesh is later cut at, so one seed always lands in one place. Only for the presets the frame
        is used for (``frame.frame_presets``); a custom ``Preset`` only where the frame names none."""
        frame = frame_of(self.hd, out.preset)
        if frame is None:
            return out
        grid, field = out.field()
        activation = "softplus" if out.distilled is not None else self.hd.config.render.density_activation
        found = surface_frame(grid, field, activation, self.opacity_length(), rule=frame.rule)
        if found is None:  # no surface to place; the mesh chain says so
            return out
        out.coarse = place_in_frame(out.coarse, *found, frame)
        if out.distilled is not None:
            out.distilled = place_in_frame(out.distilled, *found, frame)
        if out.cameras is not None:
            out.cameras = cameras_in_frame(out.cameras, *found, frame)
        return out

    def refine(self, coarse: VoxelGrid, seed: int, pre: Preset, callback: PipelineCallback | None = None
               ) -> tuple[PerspectiveCamera, Tensor, VoxelGrid, int]:
        """Stages 2 and 3 on a coarse grid: (the K view cameras, the super-resolved views, the distilled grid before
        any colour map, the distillation's iterations)."""
        cams, cond = self.conditions(coarse, pre)
        views = self.first_views(cond, seed, pre, callback)
        distilled, iterations = self.distill(coarse, views, cams, cond, seed, pre, callback)
        return cams, views, distilled, iterations

    def colour_map(self, name: str, pre: Preset) -> ColourMap | None:
        """The colour calibration of preset ``name`` (``holofusion calibrate``; ``colour.py``), or None: a custom
        preset has none, nor one whose map was measured with another super-resolution model than ``pre`` draws
        with (the map is a property of the pair)."""
        from .evaluate import weights_digest

        cmap = colour_map_of(self.hd, name)
        if cmap is None or not pre.superres:
            return cmap
        sr = self.sr_for(pre)
        if id(sr) not in self._sr_digests:
            self._sr_digests[id(sr)] = weights_digest(sr)
        return cmap if self.hd.info["colour"][name].get("superres") == self._sr_digests[id(sr)] else None

    def coarse_decoder(self) -> torch.nn.Module:
        """The decoder the coarse field is shown (and the draft preset meshed) with: the model's own, in the draft
        preset's calibrated colours where it has them."""
        cmap = colour_map_of(self.hd, "draft")
        if cmap is None:
            return self.hd.decoder
        if self._mapped is None or self._mapped[0] != cmap:
            self._mapped = (cmap, map_decoder(self.hd.decoder, cmap))
        return self._mapped[1]

    def _preset(self, preset: str | Preset) -> tuple[str, Preset]:
        if isinstance(preset, Preset):
            return "custom", preset
        if preset not in PRESETS:
            raise UserError(f"preset {preset!r} is unknown; choose from {', '.join(PRESETS)}")
        return preset, PRESETS[preset]

    @torch.no_grad()
    def coarse(self, seed: int, category: str | None, steps: int, callback: PipelineCallback | None,
               autoguidance: float | None = None) -> VoxelGrid:
        """Stage 1: the HoloDiffusion grid of ``seed`` (1, C, S, S, S), in the space the decoder renders;
        ``autoguidance`` applies where the model has a guide (None: the guide's own weight)."""
        def step(i: int, total: int, x0: Tensor) -> bool:
            return _go(callback, "coarse", i, total, None)

        try:
            x = self.hd.sample([seed], category, steps=steps, callback=step,
                               autoguidance=self.guidance_weight(autoguidance))
        except SamplingCancelled as e:
            raise PipelineCancelled("coarse", str(e)) from None
        return self.hd.to_grid(self.hd.denormalize(x))

    @torch.no_grad()
    def conditions(self, coarse: VoxelGrid, pre: Preset) -> tuple[PerspectiveCamera, Condition]:
        """The K view cameras at the super-resolution size, each cropped around the coarse object's silhouette like
        a training image, and the coarse renders at those views (the super-resolution model's conditions)."""
        cfg = self.sr_for(pre).config
        probe = 64  # silhouettes are measured on a 64 px render with a wide view
        wide = view_cameras(pre.views, pre.view_distance, 1.2, probe, pre.elevation_deg).to(self.device)
        alpha = self.hd.render(coarse.features, wide).alpha[..., 0].cpu()
        crops = []
        for i in range(pre.views):
            box = mask_crop_box(alpha[i].numpy(), threshold=0.4, context=0.3) or (0, 0, probe, probe)
            crops.append(wide[i].to("cpu").crop(*box).resize((cfg.high_size, cfg.high_size)))
        cams = PerspectiveCamera.stack(crops).to(self.device)
        low = cams.resize((cfg.low_size, cfg.low_size))
        out = self.hd.render(coarse.features, low)
        return cams, Condition.from_render(out.rgb, out.alpha, out.features)

    def first_views(self, cond: Condition, seed: int, pre: Preset, callback: PipelineCallback | None) -> Tensor:
        """Stage 2 as a preset runs it: from pure noise, or from the noised coarse renders (``sr_strength`` < 1)."""
        sr = self.sr_for(pre)
        init = None
        if pre.sr_strength < 1:
            init = (sr.upsampled(cond)[:, :3] * 0.5 + 0.5).clamp(0, 1)
        return self.super_resolve(cond, seed, pre.sr_steps, callback, init=init, strength=pre.sr_strength, sr=sr)

    def super_resolve(self, cond: Condition, seed: int, steps: int, callback: PipelineCallback | None,
                      init: Tensor | None = None, strength: float = 1.0, round_: int = 0,
                      x0_hook=None, sr: SuperRes | None = None) -> Tensor:
        """Stage 2: (K, 3, H, W) super-resolved views by ``sr`` (default: the folder's ``superres``); view k of round
        r draws from a generator seeded by (seed, r, k) alone."""
        seeds = [_view_seed(seed, round_, k) for k in range(len(cond))]

        def step(i: int, total: int, x0: Tensor) -> bool:
            return _go(callback, "superres", i, total, None)

        try:
            return (sr or self.sr).sample(cond, seeds, steps=steps, init=init, strength=strength,
                                          callback=step if round_ == 0 else None, x0_hook=x0_hook)
        except SamplingCancelled as e:
            raise PipelineCancelled("superres", str(e)) from None

    def distill(self, coarse: VoxelGrid, views: Tensor, cams: PerspectiveCamera, cond: Condition, seed: int,
                pre: Preset, callback: PipelineCallback | None) -> tuple[VoxelGrid, int]:
        """Stage 3: the explicit high-resolution grid fitted to the views, and the iterations it took."""
        cfg = pre.distill
        side = min(views.shape[-2:])
        if cfg.patch_size + 2 * cfg.shift_tolerance > side:  # a small super-resolution model's views
            cfg = replace(cfg, patch_size=max(2, side - 2 * cfg.shift_tolerance))
        with torch.no_grad():
            init = start_grid(coarse, self.hd.decoder, cfg, level=density_level(self.opacity_length()))

        sr = self.sr_for(pre)

        def resample(renders: Tensor, strength: float, round_: int) -> Tensor:
            return self.super_resolve(cond, seed, pre.sr_steps, None, init=renders, strength=strength,
                                      round_=round_, sr=sr)

        def step(i: int, total: int, preview: Tensor | None) -> bool:
            return _go(callback, "distill", i, total, preview)

        def sync(renders: Tensor, strength: float, steps: int, hook) -> Tensor:
            return self.super_resolve(cond, seed, steps, None, init=renders, strength=strength, round_=SYNC_ROUND,
                                      x0_hook=hook, sr=sr)

        gen = torch.Generator().manual_seed(_view_seed(seed, 999, 0))
        try:
            res = distill(init, views, cams, cfg, gen, resample, step, preview_every=max(1, cfg.iterations // 10),
                          sync=sync)
        except DistillCancelled as e:
            raise PipelineCancelled("distill", str(e)) from None
        return res.grid, res.iterations


SYNC_ROUND = 500
"""The round number of the synchronised phase's view seeds (re-sampling rounds are 1, 2, ...)."""


def _view_seed(seed: int, round_: int, view: int) -> int:
    return (int(seed) * 1_000_003 + round_ * 1009 + view) % (2**63 - 1)


def _go(callback: PipelineCallback | None, stage: str, step: int, total: int, preview: Tensor | None) -> bool:
    return callback is None or callback(stage, step, total, preview) is not False


def with_distill(preset: Preset, **changes) -> Preset:
    """A copy of a preset with some distillation settings changed (tests, benchmarks)."""
    return replace(preset, distill=replace(preset.distill, **changes))
