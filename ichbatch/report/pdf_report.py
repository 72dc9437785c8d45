"""One PDF per study (reportlab): identifiers, the not-for-diagnosis notice, scores, a z-profile chart,
key slices with Grad-CAM, a montage of every slice, and the top key slice in all three windows.

Text uses an embedded TrueType font (Bitstream Vera, shipped with reportlab) so names such as
MÜLLER^ZOË render as written.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas

from .. import NOT_FOR_DIAGNOSIS
from ..domain import Status, StudyImages, StudyResult
from .files import atomic_write_bytes, safe_stem

FONT, BOLD = "IchVera", "IchVeraBold"
PAGE_W, PAGE_H = A4
MARGIN = 36.0
CURVE_COLOURS = {
    "any": colors.black, "epidural": colors.red, "intraparenchymal": colors.orange,
    "intraventricular": colors.green, "subarachnoid": colors.blue, "subdural": colors.purple,
}


def _register_fonts() -> None:
    if FONT in pdfmetrics.getRegisteredFontNames():
        return
    import reportlab

    folder = Path(reportlab.__file__).parent / "fonts"
    pdfmetrics.registerFont(TTFont(FONT, str(folder / "Vera.ttf")))
    pdfmetrics.registerFont(TTFont(BOLD, str(folder / "VeraBd.ttf")))


def pdf_name(study_uid: str) -> str:
    return f"study_{safe_stem(study_uid)}.pdf"


def write_pdf(result: StudyResult, images: StudyImages, folder: Path) -> Path:
    """Render the report and write it atomically; returns its path."""
    path = Path(folder) / pdf_name(result.study.study_uid)
    atomic_write_bytes(path, render_pdf(result, images))
    return path


def render_pdf(result: StudyResult, images: StudyImages | None = None) -> bytes:
    images = images or StudyImages()
    _register_fonts()
    # Streams flate-compressed only, not also ASCII85-encoded (reportlab's default, for 7-bit transports
    # no PDF here goes through): without reportlab's C accelerator that encoding ran in pure Python and
    # took 0.8 of the 1.1 s to render three studies' reports, and it makes the file a quarter larger.
    rl_config.useA85 = 0
    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4, pageCompression=1)
    c.setTitle(f"ichbatch report {result.study.study_uid}")
    c.setAuthor("ichbatch")
    pages = 2 if result.status == Status.OK else 1
    y = _header(c, result)
    if result.status == Status.OK:
        y = _score_table(c, result, y)
        y = _chart(c, result, y)
        photos = _Photos()
        _key_slices(c, result, images, y, photos)
        _footer(c, result, 1, pages)
        c.showPage()
        _montage_page(c, result, images, photos)
    else:
        c.setFont(BOLD, 12)
        c.drawString(MARGIN, y - 20, f"Status: {result.status.value}")
        _wrapped(c, result.message, MARGIN, y - 40, FONT, 9)
    _footer(c, result, pages, pages)
    c.showPage()
    c.save()
    return buf.getvalue()


def _header(c: canvas.Canvas, r: StudyResult) -> float:
    c.setFillColor(colors.HexColor("#b00020"))
    c.rect(0, PAGE_H - 30, PAGE_W, 30, stroke=0, fill=1)
    c.setFillColor(colors.white)
    c.setFont(BOLD, 12)
    c.drawCentredString(PAGE_W / 2, PAGE_H - 20, f"{NOT_FOR_DIAGNOSIS} - automated research output")
    c.setFillColor(colors.black)
    y = PAGE_H - 52
    if r.status == Status.NOT_ASSESSED:
        # First, in plain words: there is no finding here, and why.
        c.setFillColor(colors.HexColor("#b00020"))
        c.setFont(BOLD, 12)
        c.drawString(MARGIN, y, "NOT ASSESSED: this study is not one the model can judge. No result is given.")
        c.setFillColor(colors.black)
        y = _wrapped(c, r.message, MARGIN, y - 15, FONT, 9) - 10
    c.setFont(BOLD, 15)
    c.drawString(MARGIN, y, "Intracranial hemorrhage screen (ichbatch)")
    s = r.study
    lines = [
        f"Patient: {person_name(s.patient_name)}    ID: {s.patient_id or '-'}",
        f"Accession: {s.accession or '-'}    Study date: {_date(s.study_date)}",
        f"Study UID: {s.study_uid}",
        f"Series: {r.series_description or '-'} ({r.n_slices} slices)  UID: {r.series_uid or '-'}",
        f"Model: {r.model} {r.model_version}    TTA views: {r.tta}    Status: {r.status.value}",
    ]
    for line in lines:  # wrapped, never clipped: descriptions and UIDs can be long
        y = _wrapped(c, line, MARGIN, y - 13, FONT, 9) + 11
    if r.model_trained and r.model_trained_on:
        y = _wrapped(c, f"Model trained on: {r.model_trained_on}", MARGIN, y - 13, FONT, 9) + 11
    if not r.model_trained:
        y -= 15
        c.setFillColor(colors.HexColor("#b00020"))
        c.setFont(BOLD, 10)
        c.drawString(MARGIN, y, "UNTRAINED MODEL: placeholder weights. The scores below are meaningless.")
        c.setFillColor(colors.black)
    return y - 10


def person_name(dicom_name: str) -> str:
    """DICOM PN 'DOE^JANE^M^DR^JR' as people write it: 'DOE, JANE M, DR, JR' (empty parts left out)."""
    if not dicom_name.strip():
        return "-"
    alphabetic = dicom_name.split("=")[0]  # ideographic and phonetic forms follow '='
    family, given, middle, prefix, suffix = (alphabetic.split("^") + [""] * 5)[:5]
    first = " ".join(p for p in (given, middle) if p.strip())
    parts = [p.strip() for p in (family, first, prefix, suffix) if p.strip()]
    return ", ".join(parts) if parts else "-"


def _footer(c: canvas.Canvas, r: StudyResult, page: int, pages: int) -> None:
    """On every page: who and which study this is, the notice, and the page number."""
    s = r.study
    c.setFont(FONT, 7)
    c.setFillColor(colors.black)
    text = (f"{person_name(s.patient_name)} | ID {s.patient_id or '-'} | Acc. {s.accession or '-'} | "
            f"{_date(s.study_date)} | Study UID {s.study_uid}")
    while pdfmetrics.stringWidth(text, FONT, 7) > PAGE_W - 2 * MARGIN - 60 and len(text) > 20:
        text = text[:-4] + "..."  # an over-long UID is elided here; page 1 prints it in full
    c.drawString(MARGIN, 16, text)
    c.drawRightString(PAGE_W - MARGIN, 16, f"Page {page} of {pages}")
    c.drawCentredString(PAGE_W / 2, 6, f"{NOT_FOR_DIAGNOSIS} - model {r.model} {r.model_version}")


def _date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:]}" if len(d) == 8 and d.isdigit() else (d or "-")


def _score_table(c: canvas.Canvas, r: StudyResult, y: float) -> float:
    c.setFont(BOLD, 10)
    cols = (MARGIN, MARGIN + 150, MARGIN + 240)
    y -= 14
    for x, title in zip(cols, ("Label", "Probability", "Flag")):
        c.drawString(x, y, title)
    c.setFont(FONT, 10)
    for label in r.labels:
        y -= 13
        p, flag = r.study_probs.get(label), r.flags.get(label)
        c.drawString(cols[0], y, label)
        c.drawString(cols[1], y, "not available" if p is None else f"{p:.3f}")
        c.setFillColor(colors.HexColor("#b00020") if flag else colors.black)
        c.drawString(cols[2], y, "-" if flag is None else ("FLAGGED" if flag else "no"))
        c.setFillColor(colors.black)
    if r.message:
        y -= 14
        y = _wrapped(c, "Notes: " + r.message, MARGIN, y, FONT, 8)
    return y - 6


def _wrapped(c: canvas.Canvas, text: str, x: float, y: float, font: str, size: float) -> float:
    c.setFont(font, size)
    words, line = text.split(), ""
    for word in words:
        trial = f"{line} {word}".strip()
        if pdfmetrics.stringWidth(trial, font, size) > PAGE_W - 2 * MARGIN:
            c.drawString(x, y, line)
            y, line = y - size - 2, word
        else:
            line = trial
    if line:
        c.drawString(x, y, line)
    return y - size - 2


def _chart(c: canvas.Canvas, r: StudyResult, y: float) -> float:
    """Smoothed probability of each label along the slices (inferior to superior)."""
    assert r.smoothed_probs is not None
    h, w = 110.0, PAGE_W - 2 * MARGIN - 110
    x0, y0 = MARGIN + 25, y - h - 12
    c.setFont(BOLD, 10)
    c.drawString(MARGIN, y - 6, "Probability along the slices (smoothed)")
    c.setStrokeColor(colors.grey)
    c.rect(x0, y0, w, h, stroke=1, fill=0)
    c.setFont(FONT, 7)
    for v in (0.0, 0.5, 1.0):
        c.drawRightString(x0 - 3, y0 + v * h - 2, f"{v:.1f}")
    n = r.smoothed_probs.shape[0]
    xs = [x0 + (k / max(n - 1, 1)) * w for k in range(n)]
    for j, label in enumerate(r.outputs):
        c.setStrokeColor(CURVE_COLOURS.get(label, colors.grey))
        c.setLineWidth(1.6 if label == "any" else 0.8)
        ys = [y0 + float(p) * h for p in r.smoothed_probs[:, j]]
        path = c.beginPath()
        path.moveTo(xs[0], ys[0])
        for xx, yy in zip(xs[1:], ys[1:]):
            path.lineTo(xx, yy)
        c.drawPath(path, stroke=1, fill=0)
        c.setFillColor(CURVE_COLOURS.get(label, colors.grey))
        c.drawString(x0 + w + 6, y0 + h - 9 * (j + 1), label)
    c.setFillColor(colors.black)
    c.setLineWidth(1)
    if r.slices:
        c.drawString(x0, y0 - 10, f"inferior: {r.slices[0].label}")
        c.drawRightString(x0 + w, y0 - 10, f"superior: {r.slices[-1].label}")
    return y0 - 20


# Key slices (512 px and more) go in as JPEG, which PDF readers decode natively: flate-compressing their
# pixels was half of a report's CPU time. Quality 92 without chroma subsampling keeps the overlay's colours
# and the windows' edges; small pictures (thumbnails, the colour bar) stay lossless.
JPEG_QUALITY = 92


def _image(arr: np.ndarray) -> ImageReader:
    return ImageReader(Image.fromarray(arr))


class _JpegReader(ImageReader):  # type: ignore[misc]  # reportlab has no type hints
    """A JPEG whose bytes go into the PDF as they are (DCTDecode). reportlab names each image it embeds by
    a hash of its pixels, which for a JPEG meant decoding it again only to hash it (5 ms of a report's
    ~55 in a profile); the JPEG's own bytes name it just as uniquely. Only that naming reads these
    "RGB data": a reader with a JPEG file handle is embedded from that handle."""

    def getRGBData(self) -> bytes:
        self._dataA = None  # no soft mask: drawImage reads this after asking for the data
        return bytes(self.fp.getbuffer())


def _photo(arr: np.ndarray) -> ImageReader:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return _JpegReader(buf)


class _Photos:
    """One report's JPEG readers, each picture encoded once: the top key slice's brain window is on both
    pages (reportlab stores it once either way, but would be handed a second encoding)."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[np.ndarray, ImageReader]] = {}

    def __call__(self, arr: np.ndarray) -> ImageReader:
        if id(arr) not in self._made:
            self._made[id(arr)] = (arr, _photo(arr))  # the array is held, so its id stays its own
        return self._made[id(arr)][1]


def _key_slices(c: canvas.Canvas, r: StudyResult, images: StudyImages, y: float, photo: _Photos) -> None:
    keys = [k for k in (images.key_image(ident) for ident in r.key_slices) if k is not None]
    label = next((k.heat_label for k in keys if k.gradcam is not None), "")
    c.setFont(BOLD, 10)
    title = f"heat map for '{label}' (flagged)" if label else "no heat map: no label is flagged"
    c.drawString(MARGIN, y - 6, f"Key slices: brain window (40/80); {title}")
    side = min(150.0, (y - MARGIN - 52) / 2)
    any_col = r.outputs.index("any") if "any" in r.outputs else 0
    for col, key in enumerate(keys):
        x = MARGIN + col * (side + 20)
        c.drawImage(photo(key.brain), x, y - 16 - side, side, side)
        if key.gradcam is not None:
            c.drawImage(photo(key.gradcam), x, y - 22 - 2 * side, side, side)
        c.setFont(FONT, 8)
        row = r.slices.index(key.slice)
        p = float(r.smoothed_probs[row, any_col]) if r.smoothed_probs is not None else 0.0
        c.drawString(x, y - 32 - 2 * side, f"{key.slice.label}   any {p:.3f}")
    if label:
        _colour_bar(c, MARGIN + 3 * (side + 20), y - 22 - 2 * side, side)
        _wrapped(c, f"Heat map: {r.heatmap}; colour = map x the slice's probability for '{label}', one scale "
                 "(0-1) for every study", MARGIN, y - 46 - 2 * side, FONT, 8)


def _colour_bar(c: canvas.Canvas, x: float, y: float, height: float) -> None:
    """The overlay's colour scale, 0 at the bottom to 1 at the top, the same in every report."""
    import cv2

    ramp = np.linspace(255, 0, 256).astype(np.uint8)[:, None].repeat(12, axis=1)
    rgb = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    c.drawImage(_image(rgb), x, y, 10, height)
    c.setFont(FONT, 7)
    c.drawString(x + 13, y + height - 6, "1.0")
    c.drawString(x + 13, y + height / 2 - 3, "0.5")
    c.drawString(x + 13, y, "0")


def _montage_page(c: canvas.Canvas, r: StudyResult, images: StudyImages, photo: _Photos) -> None:
    c.setFont(BOLD, 11)
    c.drawString(MARGIN, PAGE_H - MARGIN, f"All slices with their 'any' score - {NOT_FOR_DIAGNOSIS}")
    n = len(images.thumbnails)
    per_row = 8
    cell = (PAGE_W - 2 * MARGIN) / per_row
    any_col = r.outputs.index("any") if "any" in r.outputs else 0
    c.setFont(FONT, 6.5)
    y_top = PAGE_H - MARGIN - 12
    for k, (thumb, ident) in enumerate(zip(images.thumbnails, r.slices)):
        row, col = divmod(k, per_row)
        x, y = MARGIN + col * cell, y_top - (row + 1) * (cell + 8)
        if y < PAGE_H / 2 - 60:
            c.drawString(MARGIN, y + cell, f"... {n - k} more slices not shown")
            break
        c.drawImage(_image(thumb), x + 1, y + 8, cell - 2, cell - 2)
        score = float(r.slice_probs[k, any_col]) if r.slice_probs is not None else 0.0
        if ident in r.key_slices:
            c.setStrokeColor(colors.red)
            c.rect(x + 1, y + 8, cell - 2, cell - 2, stroke=1, fill=0)
        name = f"Im {ident.instance_number}" if ident.instance_number is not None else f"#{ident.index}"
        c.drawString(x + 2, y, f"{name}: {score:.2f}")
    top = images.key_image(r.key_slices[0]) if r.key_slices else None
    if top is not None:
        side = (PAGE_W - 2 * MARGIN - 20) / 3
        c.setFont(BOLD, 10)
        c.drawString(MARGIN, MARGIN + side + 16, f"Top key slice ({top.slice.label}) in the three windows")
        c.setFont(FONT, 8)
        for i, name in enumerate(("brain", "subdural", "bone")):
            x = MARGIN + i * (side + 10)
            c.drawImage(photo(getattr(top, name)), x, MARGIN + 4, side, side)
            c.drawString(x, MARGIN - 6, name)
