"""results.html beside the CSV: counts, and pages of studies with a key-slice thumbnail, scores and a
PDF link, read from the results store.

Bounded time per study: studies sit on fixed pages in order of first arrival (`<csv stem>_pages/`), so
a finished study rewrites only its own page, the page before it when it opens a new one (its 'next'
link), and the small landing page. Those writes are made at most every `seconds` (and when the run
ends or a watcher is idle): written after every study, with their fsyncs, they were 60 % of a
study's commit. Self-contained: opens from disk, no server, no scripts.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path

import cv2
import numpy as np

from .. import NOT_FOR_DIAGNOSIS
from ..config import LABELS
from ..domain import Status, StudyImages, StudyResult
from .files import atomic_write_bytes, safe_stem
from .store import ResultsStore, StoredStudy

THUMB_PX = 128
INDEX_SECONDS = 2.0  # the index shows a committed study within this long (and at the end of a run)
VIEW = "index"  # its entry in the store's record of views that may be behind
STYLE = """body{font-family:sans-serif;margin:1em} .banner{background:#b00020;color:#fff;padding:.5em;font-weight:bold}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px;font-size:13px} .flag{color:#b00020;font-weight:bold}"""


def thumb_name(study_uid: str) -> str:
    return f"study_{safe_stem(study_uid)}.png"


def write_thumbnail(result: StudyResult, images: StudyImages, folder: Path) -> Path | None:
    """The top key slice with its heat-map overlay, small, as PNG."""
    if not result.key_slices:
        return None
    key = images.key_image(result.key_slices[0])
    if key is None:
        return None
    picture = key.gradcam if key.gradcam is not None else np.repeat(key.brain[..., None], 3, axis=2)
    small = cv2.resize(picture, (THUMB_PX, THUMB_PX), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    if not ok:
        return None
    path = Path(folder) / thumb_name(result.study.study_uid)
    atomic_write_bytes(path, png.tobytes())
    return path


class HtmlIndex:
    def __init__(self, store: ResultsStore, csv_path: Path, page_size: int = 250,
                 seconds: float = INDEX_SECONDS) -> None:
        self.store = store
        self.seconds = seconds
        self._pending: set[int] = set()  # pages with a study not yet shown
        self._behind = False  # whether the store already records that this index is behind
        # The rendered rows of the pages written last (the newest one or two), by seq: rendering a page's
        # rows from the store after every study cost a few ms of the run's interpreter lock, each time.
        self._rows: dict[int, dict[int, str]] = {}
        self._written = float("-inf")  # when pages were last written (monotonic)
        self.csv_path = Path(csv_path)
        self.landing = self.csv_path.with_suffix(".html")
        self.folder = self.csv_path.with_name(self.csv_path.stem + "_pages")
        self.page_size = page_size
        if store.is_behind(VIEW):  # a run killed while it held pages back: which ones is not known
            self.render_all()
            store.set_behind(VIEW, False)

    def page_path(self, number: int) -> Path:
        return self.folder / f"page-{number:05d}.html"

    def pages(self) -> int:
        return max(1, -(-self.store.count() // self.page_size))

    def will_change(self) -> None:
        """Before a study is committed: the store records that the index may be behind, once per round of
        held-back pages, so that a run killed before they are written has them rendered on the next open."""
        self._mark(True)

    def update(self, study_uid: str) -> None:
        """After one study: its page (and the previous one when it opened a page) and the landing page
        are due; written now if `seconds` have passed since the last writing."""
        stored = self.store.study(study_uid)
        if stored is None:
            return
        number = (stored.seq - 1) // self.page_size + 1
        self._page_rows(number)[stored.seq] = _row(stored, self.page_path(number).parent)
        self._mark(True)  # for a caller that did not say will_change first
        self._pending.add(number)
        if number > 1 and (stored.seq - 1) % self.page_size == 0:
            self._pending.add(number - 1)
        if time.monotonic() - self._written >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Write the pages whose studies are not yet shown, and the landing page."""
        if not self._pending:
            return
        last = self.pages()
        for number in sorted(self._pending):
            self._write_page(number, last)
        self._write_landing(last)
        self._pending.clear()
        self._written = time.monotonic()
        self._mark(False)

    def _mark(self, behind: bool) -> None:
        if behind != self._behind:
            self.store.set_behind(VIEW, behind)
            self._behind = behind

    def ensure(self) -> None:
        """Pages are kept current as studies come (and one a killed run left behind is rendered whole when
        the next writer opens); only a missing index (a CSV from before the store, or pages deleted by
        hand) is rendered whole here, once."""
        self.flush()  # clears the store's flag too: only this writer sets it after the open
        if not self.landing.exists() or not self.page_path(self.pages()).exists():
            self.render_all()

    def render_all(self) -> None:
        last = self.pages()
        for number in range(1, last + 1):
            self._write_page(number, last)
        self._write_landing(last)

    def _write_landing(self, last: int) -> None:
        by_status = self.store.counts()
        counts = ", ".join(f"{by_status.get(s.value, 0)} {s.value.replace('_', ' ')}" for s in Status)
        links = " ".join(f'<a href="{html.escape(_rel(self.page_path(n), self.landing.parent))}">{n}</a>'
                         for n in range(1, last + 1))
        body = (f"<p>{sum(by_status.values())} studies ({counts}), from {html.escape(self.csv_path.name)}; "
                f"{self.page_size} per page, in order of arrival.</p><p>Pages: {links}</p>")
        atomic_write_bytes(self.landing, _page("ichbatch results", body).encode("utf-8"))

    def _page_rows(self, number: int) -> dict[int, str]:
        """Page `number`'s rows, rendered once from the store and then kept current by update()."""
        rows = self._rows.pop(number, None)
        if rows is None:
            base = self.page_path(number).parent
            rows = {s.seq: _row(s, base) for s in self.store.page(number, self.page_size)}
        self._rows[number] = rows  # the most recent last
        while len(self._rows) > 2:
            del self._rows[next(iter(self._rows))]
        return rows

    def _write_page(self, number: int, last: int) -> None:
        path = self.page_path(number)
        rows = "\n".join(row for _, row in sorted(self._page_rows(number).items()))
        heads = "".join(f"<th>{html.escape(x)}</th>" for x in ("key slice", "study", "status", *LABELS, "report"))
        nav = [f'<a href="{html.escape(_rel(self.landing, path.parent))}">all pages</a>']
        if number > 1:
            nav.append(f'<a href="{self.page_path(number - 1).name}">previous</a>')
        if number < last:
            nav.append(f'<a href="{self.page_path(number + 1).name}">next</a>')
        body = f"<p>Page {number}. {' | '.join(nav)}</p><table><tr>{heads}</tr>\n{rows}\n</table>"
        atomic_write_bytes(path, _page(f"ichbatch results, page {number}", body).encode("utf-8"))


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style>
</head><body><div class="banner">{html.escape(NOT_FOR_DIAGNOSIS)}</div>
<h1>{html.escape(title)}</h1>{body}</body></html>
"""


def _row(s: StoredStudy, base: Path) -> str:
    r = s.row
    pdf = r.get("report_pdf", "")
    thumb = next((p for p in s.outputs if p.endswith(".png")), "")
    img = f'<img src="{html.escape(_rel(Path(thumb), base))}" width="{THUMB_PX}" alt="key slice">' if thumb else ""
    cells = [img, html.escape(r["study_uid"]) + "<br>" + html.escape(r.get("accession", "")),
             html.escape(r["status"]) + ("<br><small>" + html.escape(r["message"][:200]) + "</small>" if r["message"] else "")]
    for label in LABELS:
        p, flag = r.get(f"prob_{label}", ""), r.get(f"flag_{label}", "")
        cells.append(f'<span class="flag">{html.escape(p)}</span>' if flag == "1" else html.escape(p or "n/a"))
    cells.append(f'<a href="{html.escape(_rel(Path(pdf), base))}">PDF</a>' if pdf else "")
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base)).replace(os.sep, "/")


__all__ = ["HtmlIndex", "write_thumbnail"]
