"""`holofusion generate`: seeds -> .glb assets (and a preview PNG beside each), with a progress bar per stage.

Each object runs the pipeline (``pipeline.py``) at the chosen preset, then the mesh chain (``mesh/asset.py``) on the
most detailed grid that ran, and is written atomically before it is reported, so an interrupted batch keeps every
object it finished. ``--count K`` makes K objects with consecutive seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import DEFAULT_MODEL
from .errors import UserError
from .frame import frame_presets
from .mesh.asset import AssetConfig, default_size, make_asset
from .mesh.extract import MeshConfig
from .mesh.gltf import glb_bytes, write_glb
from .pipeline import MODELS_DIR, PRESETS, HoloFusionPipeline, PipelineOutput, Preset, model_folders
from .server.protocol import MAX_SEED

__all__ = ["GenerateJob", "generate", "job_seeds", "output_paths", "list_models", "model_for", "known_categories",
           "preview_strip", "DEFAULT_MODEL"]

@dataclass
class GenerateJob:
    """One ``holofusion generate`` call."""

    model: str = DEFAULT_MODEL
    category: str | None = None
    seed: int = 0
    preset: str | Preset = "standard"
    """A preset name, or a ``Preset`` (Python callers: custom sizes)."""
    count: int = 1
    out: str = "object.glb"
    texture_size: int = 1024
    faces: int = 20000
    size_m: float | None = None
    opacity_length: float | None = None
    """The surface level (``MeshConfig.opacity_length``); None: the model's calibrated level."""
    device: str = "cpu"


def job_seeds(seed: int, count: int) -> list[int]:
    """The consecutive seeds of a job, all checked before the first object is made: the server's range 0 to
    2^31 - 1, so that a seed names the same object whether it runs here or on a backend."""
    if count < 1:
        raise UserError(f"--count must be at least 1; got {count}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed} is out of range: seeds are whole numbers from 0 to {MAX_SEED}")
    if seed + count - 1 > MAX_SEED:
        raise UserError(f"--seed {seed} with --count {count} reaches seed {seed + count - 1}, past the largest, "
                        f"{MAX_SEED}")
    return [seed + i for i in range(count)]


def output_paths(out: str, seeds: list[int]) -> list[Path]:
    """The .glb path of each seed: ``out`` itself for one object, ``<stem>-<seed>.glb`` beside it for several.
    A clear ``UserError`` for a path without the .glb extension or in a folder that does not exist."""
    p = Path(out)
    if p.suffix.lower() != ".glb":
        raise UserError(f"--out {out!r} must end in .glb (binary glTF), e.g. --out apple.glb")
    if not p.parent.is_dir():
        raise UserError(f"--out {out!r}: the folder {str(p.parent)!r} does not exist; create it first")
    if len(seeds) == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{s}{p.suffix}") for s in seeds]


@torch.no_grad()
def preview_strip(output: PipelineOutput, views: int = 4, size: int = 192) -> np.ndarray:
    """(size, views * size, 3) uint8: a turntable of the object's most detailed grid."""
    from .cameras import PerspectiveCamera, fly_around_cameras
    from .render import RenderConfig, render_grid

    grid, field = output.field()
    cams = fly_around_cameras(views, 9.0, 20.0, 2.0, (size, size)).to(grid.features.device)
    out = render_grid(grid, field, PerspectiveCamera.stack([cams]), RenderConfig(n_coarse=64, n_fine=32,
                                                                                 chunk_rays=4096))
    rgb = out.rgb.clamp(0, 1).cpu().numpy()
    return (np.concatenate(list(rgb), axis=1) * 255 + 0.5).astype(np.uint8)


class _StageBars:
    """The pipeline callback as one tqdm bar per stage."""

    def __init__(self, label: str, enabled: bool, observer: Callable[[str, int, int], None] | None = None):
        self.label, self.enabled, self.observer = label, enabled, observer
        self.stage: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, stage: str, step: int, total: int, preview) -> bool:
        if self.observer is not None:
            self.observer(stage, step, total)
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{self.label} {stage}", unit="step", disable=not self.enabled,
                            leave=False)
        if total != self.bar.total:  # a stage announced before it knew its length
            self.bar.total = total
        self.bar.update(step - self.bar.n)
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def generate(job: GenerateJob, progress: bool = True, observer: Callable[[str, int, int], None] | None = None,
             pipeline: HoloFusionPipeline | None = None) -> list[dict[str, Any]]:
    """Runs a job; returns one record per object written (paths, seed, faces, seconds per stage, ``glb_s``: from the
    request to the .glb on disk). ``observer(stage, step, total)`` sees every step of every stage, then "asset" (mesh
    chain and GLB) and "preview" (``holofusion bench`` times and measures the stages with it). ``pipeline``: one
    already loaded for ``job.model`` (loaded here otherwise)."""
    if isinstance(job.preset, str) and job.preset not in PRESETS:
        raise UserError(f"--preset {job.preset!r} is unknown; choose from {', '.join(PRESETS)}")
    if job.opacity_length is not None and not job.opacity_length > 0:
        raise UserError(f"--opacity-length must be positive; got {job.opacity_length}")
    seeds = job_seeds(job.seed, job.count)
    paths = output_paths(job.out, seeds)
    pipe = pipeline if pipeline is not None else HoloFusionPipeline.from_pretrained(job.model, job.device)
    try:
        mesh = MeshConfig(target_faces=job.faces, opacity_length=pipe.opacity_length(job.opacity_length))
        cfg = AssetConfig(texture_size=job.texture_size, size_m=job.size_m, mesh=mesh)
    except ValueError as e:
        raise UserError(f"bad mesh option: {e}") from None
    records = []
    for seed, path in zip(seeds, paths):
        bars = _StageBars(f"seed {seed}", progress, observer)
        t0 = time.perf_counter()
        try:
            out = pipe(seed, job.category, job.preset, bars)
        finally:
            bars.close()
        t_pipe = time.perf_counter() - t0
        grid, field = out.field()
        category = job.category or (pipe.categories[0] if len(pipe.categories) == 1 else None)
        bars = _StageBars(f"seed {seed}", progress, observer)
        bars("asset", 0, 0, None)  # the stage starts now, before its first step reports
        try:
            asset = make_asset(grid, field, cfg, category, lambda name, i, n: bars("asset", i, n, None))
        finally:
            bars.close()
        preset = job.preset if isinstance(job.preset, str) else "custom"
        extras = {"holofusion": {"model": pipe.name, "seed": seed, "category": job.category, "preset": preset,
                                 "size_m": round(float(np.ptp(asset.mesh.vertices, 0).max()), 4)}}
        write_glb(path, asset.glb(name=f"{job.category or pipe.name}_{seed}", extras=extras))
        t_glb = time.perf_counter() - t0
        if observer is not None:
            observer("preview", 0, 1)
        preview = path.with_suffix(".png")
        _write_png(preview, preview_strip(out))
        records.append({"path": str(path), "preview": str(preview), "seed": seed, "faces": asset.mesh.n_faces,
                        "pipeline_s": round(t_pipe, 2), "glb_s": t_glb, **{f"{k}_s": round(v, 3) for k, v in asset.timings.items()}})
    return records


def generate_remote(job: GenerateJob, server: str, progress: bool = True) -> list[dict[str, Any]]:
    """Runs a job on a backend (``holofusion serve``) given its connection file: the same files as ``generate``,
    rebuilt from the result messages' arrays and texture."""
    from .client import Client, result_mesh

    if not isinstance(job.preset, str):
        raise UserError("a backend takes presets by name: draft, standard or high")
    seeds = job_seeds(job.seed, job.count)
    paths = output_paths(job.out, seeds)
    records = []
    with Client(server) as client:
        client.hello()
        job_id = client.generate(seed=job.seed, model=job.model, category=job.category, preset=job.preset,
                                 count=job.count, options={"texture_size": job.texture_size, "faces": job.faces,
                                                           "size_m": job.size_m,
                                                           **({} if job.opacity_length is None else
                                                              {"opacity_length": job.opacity_length})})
        bars = _StageBars("", progress)
        try:
            for event in client.events(job_id):
                c = event.content
                if event.msg_type == "progress":
                    bars.label = f"seed {seeds[c['index']]}"
                    bars(c["stage"], c["step"], c["total"], None)
                elif event.msg_type == "result":
                    bars.close()
                    mesh = result_mesh(event)
                    arrays = {k: np.asarray(mesh[k][0], np.float32 if k != "faces" else np.uint32)
                              .reshape(mesh[k][1]) for k in ("positions", "normals", "uvs", "faces")}
                    path = paths[c["index"]]
                    write_glb(path, glb_bytes(arrays["positions"], arrays["normals"], arrays["uvs"],
                                              arrays["faces"], mesh["texture"], name=f"object_{c['seed']}",
                                              extras={"holofusion": c["metadata"]}))
                    records.append({"path": str(path), "seed": c["seed"], "faces": int(arrays["faces"].shape[0]),
                                    "job_id": job_id})
        finally:
            bars.close()
    return records


def _write_png(path: Path, image: np.ndarray) -> None:
    import os

    from PIL import Image

    tmp = path.with_name(f".{path.name}.partial")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def list_models(root: Path = MODELS_DIR) -> list[dict[str, Any]]:
    """The shipped models: name, categories, ``sizes`` (each category's largest side in metres, as the .glb has it),
    stages present (``guide``: an autoguidance model, ``guide_weight``: the weight the presets sample with), the
    presets with a colour map (``colour_maps``: ``holofusion calibrate``; ``colour.py``), and the training steps of
    each stage."""
    from .holodiffusion import GUIDE_FILE, GUIDE_WEIGHT
    from .weights import read_metadata

    rows = []
    for d in model_folders(root):
        meta = read_metadata(d / "holodiffusion.safetensors")
        sr = d / "superres.safetensors"
        cats = meta["config"].get("categories", [])
        guide = d / GUIDE_FILE
        rows.append({"name": d.name, "categories": cats,
                     # the largest side of each category's objects in the .glb: the extension lays grids out by it
                     "sizes": {c: default_size(c) for c in cats},
                     "holodiffusion_step": meta["info"].get("step"),
                     "superres": sr.is_file(),
                     "superres_high": (d / "superres_high.safetensors").is_file(),
                     # a weaker denoiser the presets' samples are pushed away from (HoloDiffusion.attach_guide)
                     "guide": guide.is_file(),
                     "guide_weight": float(read_metadata(guide)["info"].get("weight", GUIDE_WEIGHT))
                     if guide.is_file() else None,
                     "presets": list(PRESETS) if sr.is_file() else ["draft"],
                     "colour_maps": sorted(meta["info"].get("colour") or {}, key=_preset_order),
                     # the presets whose objects are moved (and scaled) into the frame the training objects
                     # share (frame.py); empty where the model has no frame
                     "frame": list(frame_presets(meta["info"]["frame"])) if meta["info"].get("frame") else []})
    return rows


def _preset_order(name: str) -> tuple[int, str]:
    return (list(PRESETS).index(name) if name in PRESETS else len(PRESETS), name)


def model_for(category: str | None, rows: list[dict[str, Any]]) -> str | None:
    """The model a request that names none goes to: the default, or, for a category the default does not know,
    the first model (by name) that does; None when no model knows the category. The shipped models hold one
    category each, so "a hydrant" needs no model name."""
    default = next((r for r in rows if r["name"] == DEFAULT_MODEL), None)
    if category is None or (default is not None and category in default["categories"]):
        return DEFAULT_MODEL
    return next((r["name"] for r in rows if category in r["categories"]), None)


def known_categories(rows: list[dict[str, Any]]) -> str:
    """The categories of all listed models, for an error message."""
    return ", ".join(sorted({c for r in rows for c in r["categories"]})) or "none"


def format_models(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"no models in {MODELS_DIR}"
    lines = [f"{'name':<16} {'categories':<32} presets"]
    for r in rows:
        presets = ", ".join(f"{p} (4x)" if p == "high" and r.get("superres_high") else p for p in r["presets"])
        guided = f"; autoguided (w {r['guide_weight']:g})" if r.get("guide") else ""
        calibrated = f"; colours calibrated for {', '.join(r['colour_maps'])}" if r.get("colour_maps") else ""
        placed = f"; objects placed in the training frame ({', '.join(r['frame'])})" if r.get("frame") else ""
        lines.append(f"{r['name']:<16} {','.join(r['categories']):<32} {presets}{guided}{calibrated}{placed}")
    return "\n".join(lines)


def records_json(records: list[dict[str, Any]]) -> str:
    return json.dumps(records, indent=2)
