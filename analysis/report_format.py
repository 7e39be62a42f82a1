"""Numbers, tables and inline marks as the report prints them, in Markdown and in HTML.

One spelling for both outputs: AUROCs to 3 places in prose and 4 in tables, p-values below 0.001
in scientific notation (0.0000 would read as "no chance at all"), intervals as [low, high].
"""
from __future__ import annotations

import html
import math
import re
from typing import Any

import numpy as np
import pandas as pd


def e(x: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(x), quote=True)


def number(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (float, np.floating)):
        return "–" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def p_value(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.1e}" if 0 < p < 1e-3 else f"{p:.3f}"


def interval(low: float, high: float, digits: int = 3) -> str:
    if any(v is None or math.isnan(v) for v in (low, high)):
        return "[no CI]"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def signed(x: float, digits: int = 3) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:+.{digits}f}"


def cell(column: str, x: Any, digits: int = 4) -> str:
    if str(column).startswith("p_") and isinstance(x, (float, np.floating)):
        return p_value(float(x))
    return number(x, digits)


def _numeric(df: pd.DataFrame, col: str) -> bool:
    return pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col])


def markdown_table(df: pd.DataFrame | None, digits: int = 4) -> str:
    if df is None or df.empty:
        return "_(no rows)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |",
             "| " + " | ".join("---:" if _numeric(df, c) else "---" for c in df.columns) + " |"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(c, v, digits).replace("|", "\\|")
                                       for c, v in zip(cols, row)) + " |")
    return "\n".join(lines) + "\n"


def html_table(df: pd.DataFrame | None, digits: int = 4) -> str:
    if df is None or df.empty:
        return "<p><em>(no rows)</em></p>"
    cls = {True: "", False: " class='t'"}
    numeric = [_numeric(df, c) for c in df.columns]
    head = "".join(f"<th{cls[n]}>{e(c)}</th>" for c, n in zip(df.columns, numeric))
    body = "".join("<tr>" + "".join(f"<td{cls[n]}>{e(cell(c, v, digits))}</td>"
                                    for c, v, n in zip(df.columns, row, numeric)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def facts_markdown(facts: dict[str, str]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in facts.items()) + "\n" if facts else "_(none)_\n"


def facts_html(facts: dict[str, str]) -> str:
    if not facts:
        return "<p><em>(none)</em></p>"
    rows = "".join(f"<tr><th class='t'>{e(k)}</th><td class='t'>{e(v)}</td></tr>"
                   for k, v in facts.items())
    return f"<table>{rows}</table>"


def inline_html(text: str) -> str:
    """The few Markdown marks the report's prose uses (**bold**, *italic*, `code`), text escaped."""
    t = e(text)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", t)
