"""Tables to files: CSV always, Markdown for the tables people read, Parquet for the per-run tables
that other tools load. Every write is atomic (common.storage), local or ``s3://``."""
from __future__ import annotations

import io
import json

import pandas as pd

from analysis.tables import markdown_table
from common import storage


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Epoch records may mix types in a column (a list in one, a number in another): keep such
    object columns as text so that Parquet has one type per column."""
    clean = df.copy()
    for c in clean.columns:
        if clean[c].dtype == object:
            clean[c] = clean[c].map(lambda v: v if v is None or isinstance(v, str)
                                    else json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    return clean


def write_table(out_dir: str, name: str, df: pd.DataFrame, *, parquet: bool = False,
                markdown: bool = True) -> list[str]:
    """``name.csv`` (+ ``name.md``, + ``name.parquet``) in ``out_dir``; the file names written."""
    files = []
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    storage.write_bytes(storage.join(out_dir, f"{name}.csv"), buf.getvalue().encode())
    files.append(f"{name}.csv")
    if markdown:
        storage.write_bytes(storage.join(out_dir, f"{name}.md"), markdown_table(df).encode())
        files.append(f"{name}.md")
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(_parquet_safe(df), preserve_index=False), sink)
        storage.write_bytes(storage.join(out_dir, f"{name}.parquet"), sink.getvalue())
        files.append(f"{name}.parquet")
    return files


def write_figures(out_dir: str, figures: dict[str, bytes]) -> list[str]:
    for fname, png in figures.items():
        storage.write_bytes(storage.join(out_dir, "figures", fname), png)
    return [f"figures/{fname}" for fname in figures]


def write_text(out_dir: str, name: str, text: str) -> list[str]:
    storage.write_bytes(storage.join(out_dir, name), text.encode())
    return [name]
