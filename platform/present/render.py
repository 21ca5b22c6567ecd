"""The report's building blocks and their rendering: `Block`s (heading, text, table, figure) and `Link`
cells, number formatting (accuracies in percent, their differences in percentage points, other numbers to 3
significant figures), and the blocks written as one self-contained HTML page or as Markdown."""
import base64
import html
import math
from dataclasses import dataclass, field

from ..base import figures
from ..track import sweep_records


@dataclass
class Link:
    """A table cell that links to a page (an MLflow run)."""
    text: str
    url: str

    def __str__(self) -> str:
        return f"[{self.text}]({self.url})"


@dataclass
class Block:
    kind: str                  # heading | text | table | figure
    text: str = ""
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    png: bytes = b""
    name: str = ""


def fmt(value, metric: str = "") -> str:
    """3 significant figures (accuracies in percent, one decimal); numbers that MLflow keeps as text too."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if figures.is_accuracy(metric) else f"{value:.3g}"
    return str(value)


def with_interval(value, low, high, metric: str) -> str:
    text = fmt(value, metric)
    return text if low is None else f"{text} [{fmt(low, metric)}, {fmt(high, metric)}]"


def fmt_difference(value: float, metric: str) -> str:
    """A difference of accuracies in percentage points (two decimals), others to three digits."""
    return f"{100 * value:+.2f} pp" if figures.is_accuracy(metric) else f"{value:+.3g}"


# --- rendering -------------------------------------------------------------------------------------------

def to_markdown(blocks: list[Block], figure_dir: str) -> str:
    lines = []
    for block in blocks:
        if block.kind == "heading":
            lines += [("# " if not lines else "## ") + block.text, ""]
        elif block.kind == "text":
            lines += [block.text, ""]
        elif block.kind == "table":
            lines += ["| " + " | ".join(map(str, block.columns)) + " |", "|" + "---|" * len(block.columns)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in block.rows] + [""]
        else:
            lines += [f"![{block.name}]({figure_dir}/{block.name}.png)", "", f"*{block.text}*", ""]
    return "\n".join(lines)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222;"
         "line-height:1.45}.scroll{overflow-x:auto;margin:1em 0}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 6px;font-size:90%;white-space:nowrap;text-align:left}"
         "th{background:#f3f3f3;position:sticky;top:0}tr.baseline td{font-weight:bold;background:#eef4fb}"
         "td.noise{color:#888}img{max-width:100%;height:auto}figure{margin:1.5em 0}"
         "figcaption{color:#555;font-size:90%;max-width:900px}")


def _cell(value) -> str:
    if isinstance(value, Link):
        return f"<td><a href='{html.escape(value.url)}'>{html.escape(value.text)}</a></td>"
    noise = " class='noise'" if isinstance(value, sweep_records.Difference) and value.within_noise else ""
    return f"<td{noise}>{html.escape(str(value))}</td>"


def _png_width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")  # the IHDR chunk's width


def to_html(blocks: list[Block], title: str) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>"]
    first = True
    for block in blocks:
        if block.kind == "heading":
            tag = "h1" if first else "h2"
            parts.append(f"<{tag}>{html.escape(block.text)}</{tag}>")
            first = False
        elif block.kind == "text":
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif block.kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in block.columns)
            body = "".join(f"<tr{' class=baseline' if 'baseline' in row else ''}>" + "".join(map(_cell, row))
                           + "</tr>" for row in block.rows)
            parts.append(f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>")
        else:  # drawn at figures.DPI, shown at 96 CSS pixels per inch: sharp on high-density screens too
            data = base64.b64encode(block.png).decode()
            width = round(_png_width(block.png) * 96 / figures.DPI)
            parts.append(f"<figure><img alt='{block.name}' width='{width}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(block.text)}</figcaption></figure>")
    return "\n".join(parts + ["</body></html>"])
