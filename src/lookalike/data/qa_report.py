"""What prepare shows a person: a summary table in the terminal and data/qa.html, a page with every photo's
thumbnail (the chosen face and the crop drawn over it), whether it was kept, why, and its caption; and the class
images prior preservation trains on, once drawn."""

from __future__ import annotations

import html
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lookalike.workspace import atomic_path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; }
.card { width: 260px; border: 1px solid #ccc; border-radius: 6px; padding: 8px; }
.card.excluded { border-color: #c33; background: #fff4f4; }
.card svg { width: 256px; height: 256px; background: #eee; }
.status { font-weight: bold; } .kept .status { color: #282; } .excluded .status { color: #c33; }
ul { padding-left: 1.2em; margin: 4px 0; font-size: 13px; }
.caption { font-size: 13px; font-style: italic; margin-top: 4px; }
"""


def _figure(photo) -> str:
    """The thumbnail in an SVG whose coordinates are the photo's pixels, so boxes need no rescaling."""
    if photo.thumbnail is None:
        return '<svg viewBox="0 0 256 256"><text x="128" y="128" text-anchor="middle">unreadable</text></svg>'
    width, height = photo.size
    shapes = [f'<image href="{html.escape(photo.thumbnail)}" width="{width}" height="{height}"/>']
    stroke = max(width, height) / 128
    for index, face in enumerate(photo.faces):
        left, top, right, bottom = face["box"]
        colour = "#2c2" if index == photo.face else "#fa0"
        shapes.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
                      f'stroke="{colour}" stroke-width="{stroke}"/>')
    if photo.crop_box is not None:
        left, top, right, bottom = photo.crop_box
        shapes.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
                      f'stroke="#29f" stroke-width="{stroke}" stroke-dasharray="{4 * stroke}"/>')
    return f'<svg viewBox="0 0 {width} {height}">{"".join(shapes)}</svg>'


def _class_section(data: Path, class_pages: list[Path]) -> str:
    """The class images of each prior/<base>-<size>/ folder, linked by paths relative to the page."""
    if not class_pages:
        return ""
    parts = []
    for page in class_pages:
        folder = os.path.relpath(page.parent, data)
        images = "".join(f'<img src="{html.escape(folder)}/{html.escape(image.name)}" width="96">'
                         for image in sorted(page.parent.glob("*.png"))[:12])
        parts.append(f'<p><a href="{html.escape(folder)}/index.html">{html.escape(page.parent.name)}</a></p>'
                     f'<div class="grid">{images}</div>')
    return f"<h2>Class images (prior preservation)</h2>{''.join(parts)}"


def write_qa_page(data: Path, photos: list, class_pages: list[Path] = ()) -> None:
    kept = sum(p.status == "kept" for p in photos)
    cards = []
    for photo in photos:
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in photo.reasons) or "<li>all checks passed</li>"
        caption = f'<div class="caption">“{html.escape(photo.caption)}”</div>' if photo.caption else ""
        cards.append(f'<div class="card {photo.status}">{_figure(photo)}<div>{html.escape(Path(photo.source).name)}'
                     f' <span class="status">{photo.status}</span></div>{caption}<ul>{reasons}</ul></div>')
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>lookalike prepare: QA</title>'
            f"<style>{STYLE}</style></head><body><h1>Prepared photos</h1>"
            f"<p>{kept} kept, {len(photos) - kept} excluded. Green: the subject's face; orange: other faces; "
            f'dashed blue: the training crop.</p><div class="grid">{"".join(cards)}</div>'
            f"{_class_section(data, list(class_pages))}</body></html>")
    with atomic_path(data / "qa.html") as tmp:
        tmp.write_text(page)


def print_summary(console: Console, photos: list) -> None:
    table = Table("photo", "status", "faces", "probability", "upscale", "reasons", title="prepare")
    for photo in photos:
        face = photo.faces[photo.face] if photo.face is not None else None
        table.add_row(Path(photo.source).name, photo.status, str(len(photo.faces)),
                      f"{face['probability']:.3f}" if face else "-",
                      f"{photo.upscale:.2f}x" if photo.upscale else "-", "; ".join(photo.reasons))
    console.print(table)
