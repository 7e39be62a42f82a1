"""Shared fixtures: one tiny phantom store per test session (built in-process, no Ray)."""
from __future__ import annotations

import pytest

#: Studies in the session's phantom: enough for the trainer's learning check (about 60 validation
#: studies, a third Cardiomegaly-positive), small enough to build in seconds at 32 and 64 px.
TINY_PHANTOM_STUDIES = 300
TINY_PHANTOM_RESOLUTIONS = (32, 64)


@pytest.fixture(scope="session")
def tiny_phantom_images(tmp_path_factory):
    """A tiny phantom dataset (image root with train.csv/valid.csv), 64-96 px sources."""
    from preprocessing.phantom import make_phantom
    root = tmp_path_factory.mktemp("tiny-phantom")
    make_phantom(str(root), studies=TINY_PHANTOM_STUDIES, seed=0, min_size=64, max_size=96,
                 workers=2)
    return root


@pytest.fixture(scope="session")
def tiny_phantom_store(tmp_path_factory, tiny_phantom_images):
    """Location (str) of a store built from the tiny phantom at resolutions 32 and 64."""
    from preprocessing.build import build_store
    out = tmp_path_factory.mktemp("tiny-store") / "store"
    root = tiny_phantom_images
    build_store(str(root), [str(root / "train.csv"), str(root / "valid.csv")], str(out),
                resolutions=TINY_PHANTOM_RESOLUTIONS, use_ray=False, progress=False)
    return str(out)
