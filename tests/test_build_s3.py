"""A store built to ``s3://`` on a local S3-compatible server (moto's server mode on 127.0.0.1)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from preprocessing import build
from preprocessing.manifest import verify_store
from preprocessing.resize import reference_resize
from preprocessing.store import StoreError, decode_image, open_store
try:  # tests/ as a plain folder (pytest's default rootdir import) or as a package
    from test_store import cli, make_dataset, write_dataset
except ImportError:
    from tests.test_store import cli, make_dataset, write_dataset

def test_build_verify_read_and_rerun_on_s3(tmp_path, s3_endpoint, capsys):
    endpoint, client = s3_endpoint
    out = f"s3://stores/demo/store?endpoint_override={endpoint}&scheme=http"
    root = tmp_path / "src"
    rows = make_dataset(root, 3, 1)
    csvs = write_dataset(root, rows)
    manifest = build.build_store(str(root), csvs, out, resolutions=[16, 32], shard_size=2,
                                 use_ray=False, draft_factor=None, reduce_factor=None, progress=False)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="stores")["Contents"])
    assert "demo/store/manifest.json" in keys and "demo/store/rejects.csv" in keys
    assert "demo/store/res32/train/shard-00001.parquet" in keys
    assert not [k for k in keys if ".tmp-" in k or ".write-probe" in k]
    assert verify_store(out) == []
    assert cli("verify", [out]) == 0
    assert "s3://stores/demo/store: OK" in capsys.readouterr().out

    store = open_store(out, resolution=32)
    table = store.read(32, "train").to_pylist()
    assert len(table) == manifest["counts"]["per_split"]["train"]["stored"] == 4
    for rec in table:
        ref = reference_resize((root / rec["image_id"]).read_bytes(), 32)
        np.testing.assert_array_equal(decode_image(rec["image"], store.encoding), ref)

    built = []
    build.build_store(str(root), csvs, out, resolutions=[16, 32], shard_size=2, use_ray=False,
                      draft_factor=None, reduce_factor=None, progress=False, on_shard=built.append)
    assert built == []                                   # every shard was already done

    body = bytearray(client.get_object(Bucket="stores", Key="demo/store/res16/valid/shard-00000.parquet")["Body"].read())
    body[-20] ^= 0xFF
    client.put_object(Bucket="stores", Key="demo/store/res16/valid/shard-00000.parquet", Body=bytes(body))
    assert cli("verify", [out]) == 1
    assert "res16/valid/shard-00000.parquet" in capsys.readouterr().err
    with pytest.raises(StoreError, match="res16/valid/shard-00000.parquet"):
        open_store(out)
