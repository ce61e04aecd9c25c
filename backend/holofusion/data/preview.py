"""Contact sheets of CO3Dv2-format datasets: one row of views per category, for people to look at."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import DataError, UserError
from .co3d import FRAME_ANNOTATIONS, load_frame_annotations

LABEL_WIDTH = 110


def dataset_categories(root: Path) -> list[str]:
    """Categories of a dataset root: the folders that hold a frame_annotations.jgz, sorted."""
    if not root.is_dir():
        raise UserError(f"dataset folder {str(root)!r} does not exist")
    cats = sorted(p.name for p in root.iterdir() if (p / FRAME_ANNOTATIONS).is_file())
    if not cats:
        raise DataError(f"{root}: no category folder with a {FRAME_ANNOTATIONS}; is this a CO3Dv2-format dataset?")
    return cats


def contact_sheet(root: str | os.PathLike, out: str | os.PathLike, per_category: int = 8, tile: int = 128) -> Path:
    """Writes a PNG with one row per category: ``per_category`` views, each from a different sequence where the
    dataset has enough sequences (spread over the sequence list), the category's name on the left.

    Returns the path written. The file appears only when complete (written beside it, then renamed).
    """
    root, out = Path(root), Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file; got {str(out)!r}")
    if not out.parent.is_dir():
        raise UserError(f"output folder {str(out.parent)!r} does not exist")
    cats = dataset_categories(root)
    sheet = Image.new("RGB", (LABEL_WIDTH + per_category * tile, len(cats) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for row, cat in enumerate(cats):
        records = load_frame_annotations(root, cat)
        by_seq: dict[str, list] = {}
        for r in records:
            by_seq.setdefault(r.sequence_name, []).append(r)
        seqs = list(by_seq)
        n = len(seqs)
        picks = []
        for k in range(per_category):
            if n >= per_category:  # one view each of sequences spread over the list
                frames = by_seq[seqs[(k * n) // per_category]]
                picks.append(frames[0])
            else:  # few sequences: cycle through them, showing a different view on each pass
                frames = by_seq[seqs[k % n]]
                picks.append(frames[((k // n) * max(1, len(frames) // 3)) % len(frames)])
        for col, rec in enumerate(picks):
            path = root / rec.image_path
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    im.thumbnail((tile, tile))
            except (OSError, ValueError) as e:
                raise DataError(f"{rec.image_path}: cannot read the image of {rec.where} ({e})") from None
            x = LABEL_WIDTH + col * tile + (tile - im.width) // 2
            sheet.paste(im, (x, row * tile + (tile - im.height) // 2))
        draw.text((8, row * tile + tile // 2 - 6), cat, fill=(0, 0, 0))
    tmp = out.with_name(f".{out.name}.partial")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    return out
