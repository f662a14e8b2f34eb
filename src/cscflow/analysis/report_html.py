"""The HTML of a report page: sections, tables, figures that fail softly, the page itself.

Shared by the exploration report and the CHGGen report.
"""

from __future__ import annotations

import errno
import html
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

__all__ = ["HtmlCell", "ReportOutput", "Section", "add_figure", "render_page", "report_dir", "table"]

logger = logging.getLogger(__name__)


@dataclass
class Section:
    """One block of the page: figures, an HTML body, and notes on what is missing."""

    key: str
    title: str
    figures: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the page, caption)
    body: str = ""
    missing: list[str] = field(default_factory=list)


class ReportOutput(BaseModel):
    """Where the report is and what it could not show."""

    index_html: str
    figures: list[str] = Field(default_factory=list, description="image paths relative to the report folder")
    missing: dict[str, list[str]] = Field(default_factory=dict, description="section -> what is missing and why")
    n_iterations: int = 0
    finished: bool = False
    seconds: float = 0.0


class HtmlCell(str):
    """A table cell that is already HTML (a link): not escaped."""


def table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    def cell(v):
        if isinstance(v, HtmlCell):
            return str(v)
        if v is None:
            return "–"
        if isinstance(v, float):
            return "nan" if not np.isfinite(v) else f"{v:.4g}"
        if isinstance(v, bool):
            return "✓" if v else ""
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def report_dir(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """`out_dir` (default RUN_DIR/report) with its figures/ folder, created before any work; one
    RunError line when it cannot be written (a read-only run directory needs --out)."""
    from cscflow.runner import RunError

    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        denied = not (os.access(out, os.W_OK) and os.access(out / "figures", os.W_OK))
        problem = None
    except OSError as exc:
        denied = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        problem = exc.strerror or type(exc).__name__
    if not denied and problem is None:
        return out
    if out_dir is None and denied:
        raise RunError(f"{run_dir} is read-only: pass --out DIR")
    raise RunError(f"{out}: cannot write the report ({problem or 'read-only'}): pass another --out DIR")


def add_figure(section: Section, out: Path, name: str, caption: str, draw: Callable[[Path], Any]) -> Any:
    """Draw one figure; a ValueError (nothing to draw) or a failure becomes a 'missing' note."""
    path = out / "figures" / name
    try:
        result = draw(path)
    except ValueError as exc:
        section.missing.append(f"{caption}: {exc}")
        return None
    except Exception as exc:  # one broken figure must not cost the whole page
        logger.exception("figure %s failed", name)
        section.missing.append(f"{caption}: failed ({type(exc).__name__}: {exc})")
        return None
    section.figures.append((f"figures/{name}", caption))
    return result


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1250px;color:#222}
h1{margin-bottom:0.2em} h2{border-bottom:1px solid #ccc;padding-bottom:0.2em;margin-top:1.6em}
figure{display:inline-block;margin:0.5em 1em 0.5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:0.85em;color:#555;max-width:700px}
table{border-collapse:collapse;font-size:0.8em;margin:0.6em 0} td,th{border:1px solid #ddd;padding:2px 6px}
th{background:#f3f3f3} .missing{color:#a15c00;font-size:0.9em} code{background:#f5f5f5;padding:0 3px}
nav a{margin-right:0.8em;font-size:0.9em}
"""


def render_page(title: str, run_dir: Path, sections: list[Section], seconds: float) -> str:
    """The report page: navigation, a 'what is missing' list, then each section."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cscflow report: {html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>cscflow report: {html.escape(title.split(' (')[0])}</h1>",
        f"<p>Run directory <code>{html.escape(str(run_dir))}</code>; written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} in {seconds:.1f} s.</p>",
        "<nav>" + "".join(f'<a href="#{s.key}">{html.escape(s.title.split(" (")[0])}</a>' for s in sections) + "</nav>",
    ]
    missing = [(s, m) for s in sections for m in s.missing]
    if missing:
        parts.append('<h2 id="missing">What is missing</h2><ul class="missing">'
                     + "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a>: {html.escape(m)}</li>'
                               for s, m in missing) + "</ul>")
    for s in sections:
        parts.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        for m in s.missing:
            parts.append(f'<p class="missing">missing: {html.escape(m)}</p>')
        for src, caption in s.figures:
            parts.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        if s.body:
            parts.append(s.body)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
