"""The script's docstring ("what to try") as readable HTML for the notes panel.

The teaching examples write their docstrings as plain text: a title line, paragraphs, and
numbered steps ("1. Train as is ...") whose lines wrap. :func:`doc_html` keeps that structure:
the title becomes a heading, numbered and bulleted lines become lists (wrapped lines joined to
their item), a line ending in a colon ("What to try:") is set in bold, and ``code`` in backticks
is set in a fixed font.
"""

from __future__ import annotations

import re
from html import escape
from typing import TYPE_CHECKING

from .. import theme

if TYPE_CHECKING:
    from lrviz.scriptinfo import ScriptInfo

_ITEM = re.compile(r"^\s*(?:(\d+)[.)]|[-*•])\s+(.*)$")
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", escape(text))


def _paragraph(lines: list[str]) -> str:
    """One block of the docstring: text lines, then maybe a list whose items may wrap."""
    out: list[str] = []
    text: list[str] = []
    items: list[list[str]] = []
    ordered = False

    def flush_text() -> None:
        if text:
            joined = " ".join(t.strip() for t in text)
            if joined.endswith(":") and len(joined) < 100:
                out.append(f"<p style='margin-bottom:2px'><b>{_inline(joined)}</b></p>")
            else:
                out.append(f"<p>{_inline(joined)}</p>")
            text.clear()

    def flush_items() -> None:
        if items:
            tag = "ol" if ordered else "ul"
            lis = "".join(f"<li style='margin-bottom:4px'>{_inline(' '.join(s.strip() for s in it))}</li>"
                          for it in items)
            out.append(f"<{tag} style='margin-top:2px; margin-left:-18px'>{lis}</{tag}>")
            items.clear()

    for line in lines:
        m = _ITEM.match(line)
        if m:
            flush_text()
            if not items:
                ordered = m.group(1) is not None
            items.append([m.group(2)])
        elif items and line.strip():
            items[-1].append(line)
        else:
            flush_items()
            text.append(line)
    flush_text()
    flush_items()
    return "".join(out)


def doc_html(doc: str) -> str:
    """The docstring as HTML: title, paragraphs, lists."""
    blocks = [b for b in re.split(r"\n\s*\n", doc.strip()) if b.strip()]
    if not blocks:
        return ""
    out: list[str] = []
    first = blocks[0].splitlines()
    if len(first) == 1 and len(blocks) > 1:
        out.append(f"<h3 style='margin-bottom:4px'>{_inline(first[0].strip())}</h3>")
        blocks = blocks[1:]
    for b in blocks:
        out.append(_paragraph(b.splitlines()))
    return "".join(out)


def notes_html(exp: ScriptInfo) -> str:
    """The whole notes panel for a script (as the worker described it): its docstring, its knobs
    (with their choices), its defaults."""
    doc = exp.doc or "This script has no docstring. Add one at the top of the file to note what to try."
    body = doc_html(doc)
    choices = getattr(exp, "param_choices", None) or {}
    knobs = ""
    if exp.params:
        rows = []
        for k, v in exp.params.items():
            extra = ""
            if k in choices:
                extra = f" <span style='color:{theme.GREY}'>(one of {', '.join(escape(str(c)) for c in choices[k])})</span>"
            rows.append(f"<li><code>{escape(k)}</code> = {escape(repr(v))}{extra}</li>")
        knobs = f"<p style='margin-bottom:2px'><b>Knobs (PARAMS)</b></p><ul style='margin-left:-18px'>{''.join(rows)}</ul>"
    defaults = ""
    if exp.defaults:
        items = ", ".join(f"{escape(k)}={escape(str(v))}" for k, v in exp.defaults.items())
        defaults = f"<p style='color:{theme.GREY}'>DEFAULTS: {items}</p>"
    where = f"<p style='color:{theme.GREY}'>{escape(exp.path.name)} · {escape(str(exp.path.parent))}</p>"
    return f"{body}{knobs}{defaults}{where}"
