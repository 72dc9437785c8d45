"""results.html beside the CSV: one line per study with a key-slice thumbnail, scores and a PDF link.

Built from the CSV (so it lists every study, including those from earlier runs) and thumbnails saved
beside the PDFs. Self-contained: opens from disk in a browser, no server, no scripts.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import cv2
import pandas as pd

from .. import NOT_FOR_DIAGNOSIS
from ..config import LABELS
from ..domain import StudyResult
from .files import atomic_write_bytes, safe_stem

THUMB_PX = 128


def thumb_name(study_uid: str) -> str:
    return f"study_{safe_stem(study_uid)}.png"


def write_thumbnail(result: StudyResult, folder: Path) -> Path | None:
    """The top key slice with its Grad-CAM overlay, small, as PNG."""
    if not result.key_slices or result.key_slices[0] not in result.key_images:
        return None
    rgb = result.key_images[result.key_slices[0]]["gradcam"]
    small = cv2.resize(rgb, (THUMB_PX, THUMB_PX), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    if not ok:
        return None
    path = Path(folder) / thumb_name(result.study.study_uid)
    atomic_write_bytes(path, png.tobytes())
    return path


def write_index(csv_path: Path, out: Path | None = None) -> Path:
    out = Path(out or Path(csv_path).with_name("results.html"))
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    rows = "\n".join(_row(r, out.parent) for r in df.to_dict("records"))
    heads = "".join(f"<th>{html.escape(x)}</th>" for x in ("key slice", "study", "status", *LABELS, "report"))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ichbatch results</title>
<style>body{{font-family:sans-serif;margin:1em}} .banner{{background:#b00020;color:#fff;padding:.5em;font-weight:bold}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px;font-size:13px}} .flag{{color:#b00020;font-weight:bold}}</style>
</head><body><div class="banner">{html.escape(NOT_FOR_DIAGNOSIS)}</div>
<h1>ichbatch results</h1><p>{len(df)} studies, from {html.escape(Path(csv_path).name)}.</p>
<table><tr>{heads}</tr>
{rows}
</table></body></html>
"""
    atomic_write_bytes(out, page.encode("utf-8"))
    return out


def _row(r: dict[str, str], base: Path) -> str:
    pdf = r.get("report_pdf", "")
    thumb = Path(pdf).with_name(thumb_name(r["study_uid"])) if pdf else None
    img = f'<img src="{html.escape(_rel(thumb, base))}" width="{THUMB_PX}" alt="key slice">' if thumb and thumb.exists() else ""
    cells = [img, html.escape(r["study_uid"]) + "<br>" + html.escape(r.get("accession", "")),
             html.escape(r["status"]) + ("<br><small>" + html.escape(r["message"][:200]) + "</small>" if r["message"] else "")]
    for label in LABELS:
        p, flag = r.get(f"prob_{label}", ""), r.get(f"flag_{label}", "")
        cells.append(f'<span class="flag">{html.escape(p)}</span>' if flag == "1" else html.escape(p or "n/a"))
    cells.append(f'<a href="{html.escape(_rel(Path(pdf), base))}">PDF</a>' if pdf else "")
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


__all__ = ["write_index", "write_thumbnail"]
