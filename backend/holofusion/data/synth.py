"""`holofusion dataset synth`: a procedural multi-view dataset written in the CO3Dv2 format.

Every sequence is one procedural object (an SDF with an albedo field, see ``procedural.py``) rendered from varied
cameras. Sequences are rendered in worker processes, each writing its own frame files; the main process gathers the
annotation records and writes the annotation files. Everything is written into a hidden folder beside the target
and renamed into place only when complete, so a failure or Ctrl-C never leaves a half-written dataset behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import UserError
from .co3d import FRAME_TYPE_FOR_SPLIT, Co3dWriter, split_sequences, write_category_to_subset, write_frame

SUBSET = "fewview_dev"
POINTS_PER_SEQUENCE = 4096
# Held-out fractions: val and test sequences are whole objects the trainer never sees.
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class SequenceJob:
    """One sequence to render: category, object seed, number of views, image size, and where to write."""

    category: str
    seed: int
    name: str
    views: int
    size: int
    split: str
    root: str


def parse_categories(text: str) -> list[str]:
    """'apple,donut' or 'all' -> a list of known categories; anything else is a ``UserError``."""
    from .procedural import CATEGORIES

    names = [c.strip() for c in text.split(",") if c.strip()]
    if names == ["all"]:
        return list(CATEGORIES)
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown or not names:
        raise UserError(f"unknown category {', '.join(map(repr, unknown)) or repr(text)}; "
                        f"choose from {', '.join(CATEGORIES)} (comma-separated) or 'all'")
    return list(dict.fromkeys(names))


def sequence_name(seed: int) -> str:
    return f"synth_{seed:07d}"


def _render_sequence(job: SequenceJob) -> tuple[list[dict], object, object]:
    """Worker: renders and writes one sequence's frames; returns its frame records and surface point cloud."""
    import torch

    from .procedural import make_object, observed_colours, random_light, render_views, sequence_cameras

    obj = make_object(job.category, job.seed)
    cams = sequence_cameras(job.seed, job.views, (job.size, job.size), bounding_radius=obj.bounding_radius)
    # The light is part of the "room" of one video: fixed within a sequence, varied between sequences.
    light = random_light(torch.Generator().manual_seed(job.seed * 2 + 1))
    images, masks, depth = render_views(obj, cams, light=light)
    frame_type = FRAME_TYPE_FOR_SPLIT[job.split]
    records = [write_frame(job.root, job.category, job.name, i, images[i], masks[i], depth[i], cams[i],
                           frame_type=frame_type) for i in range(job.views)]
    points, _ = obj.sample_surface(POINTS_PER_SEQUENCE, torch.Generator().manual_seed(job.seed))
    # Colours as the video shows them (shading of this sequence's light, no highlight), not the bare albedo: a CO3D
    # point cloud's colours are read off its frames, and a model learns its colours from the frames too.
    colours = observed_colours(obj, points, light)
    return records, points.numpy(), colours.numpy()


def _init_worker() -> None:
    import torch

    # Processes, not threads, carry the parallelism: one thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)


def _prepare_target(out: Path) -> Path:
    """Checks that ``out`` can be created and returns the hidden temporary folder to write into."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder {str(out)!r} already exists and is not empty; choose a new folder")
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {str(out)!r}: its parent folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {str(parent)!r}: permission denied; choose another --out")
    tmp = parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write into {str(parent)!r}: {e.strerror or e}") from None
    return tmp


def synthesize(categories: str | list[str], sequences: int, views: int, size: int, out: str | os.PathLike,
               seed: int = 0, workers: int = 0, progress: bool = True) -> Path:
    """Writes a complete CO3Dv2-format dataset of procedural objects to ``out`` and returns its path.

    Args:
        categories: names or a comma-separated string ('all' for every category).
        sequences: objects per category; sequence i of a category renders the object of seed ``seed + i``.
        views: images per sequence; size: image side in pixels.
        workers: processes (0: one per CPU core, at most 8).
    """
    cats = parse_categories(categories) if isinstance(categories, str) else parse_categories(",".join(categories))
    for name, value in (("sequences", sequences), ("views", views), ("size", size)):
        if int(value) <= 0:
            raise UserError(f"--{name} must be at least 1; got {value}")
    if size < 16:
        raise UserError(f"--size must be at least 16 pixels; got {size}")
    out = Path(out).expanduser().absolute()
    tmp = _prepare_target(out)
    workers = workers or min(os.cpu_count() or 1, 8)
    start = time.perf_counter()
    try:
        jobs, splits = [], {}
        for cat in cats:
            names = [sequence_name(seed + i) for i in range(sequences)]
            splits[cat] = split_sequences(names, VAL_FRACTION, TEST_FRACTION, seed=seed)
            jobs += [SequenceJob(cat, seed + i, names[i], views, size, splits[cat][names[i]], str(tmp))
                     for i in range(sequences)]
        writers = {cat: Co3dWriter(tmp, cat) for cat in cats}
        bar = tqdm(total=len(jobs) * views, unit="img", desc="rendering", disable=not progress)
        ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
        with ctx.Pool(workers, initializer=_init_worker) if workers > 1 else _InlinePool() as pool:
            for job, (records, points, colours) in zip(jobs, pool.imap(_render_sequence, jobs)):
                w = writers[job.category]
                for r in records:
                    w.add_record(r)
                w.add_sequence(job.name, points, colours)
                bar.update(len(records))
        bar.close()
        subsets = {cat: w.close() for cat, w in writers.items()}
        write_category_to_subset(tmp, subsets, merge=False)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        n = len(cats) * sequences * views
        dt = time.perf_counter() - start
        print(f"wrote {n} images of {len(cats)} categories to {out} in {dt:.1f} s ({60 * n / dt:.0f} images/min)")
    return out


class _InlinePool:
    """The pool interface, run in this process (one worker: no start-up cost).

    The tracer is fastest on one thread (its tensors are small); the caller's thread count is restored on exit.
    """

    def __enter__(self):
        import torch

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self._threads)
        return False

    @staticmethod
    def imap(fn, items):
        return map(fn, items)
