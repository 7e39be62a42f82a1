"""``python -m orchestrator.sweep init``: write a starter ``cxr-sweep.toml`` in this folder.

The sweep reads the nearest ``cxr-sweep.toml`` (this folder or a parent) before the
``CXR_SWEEP_*`` variables and the flags, so with one in place the thesis command is just
``python -m orchestrator.sweep --resolutions 160,240,320,400,480``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from common.cli import UserError, run_cli
from orchestrator.sweep_config import CONFIG_FILE

EPILOG = """examples:
  python -m orchestrator.sweep init --store /data/cxr-store --storage /data/sweeps --name thesis
  python -m orchestrator.sweep init --store s3://bucket/store --storage s3://bucket/sweeps
  python -m orchestrator.sweep init --force        # overwrite an existing cxr-sweep.toml
"""

TEMPLATE = """\
# Settings of `python -m orchestrator.sweep` (written by `python -m orchestrator.sweep init`).
# Keys are the long flag names of `python -m orchestrator.sweep --help`; CXR_SWEEP_<FLAG>
# environment variables and flags given on the command line override them.

store = {store}          # built by python -m preprocessing build
storage = {storage}      # this sweep is STORAGE/NAME
name = {name}

# resolutions = [160, 240, 320, 400, 480]
# models = ["resnet50", "resnet152", "densenet121", "densenet161", "efficientnet"]
# seeds = "0-4"
# task-mode = "multi"
# gpus-per-trial = "auto"
# log = ["tensorboard"]          # tensorboard, mlflow, wandb
# address = "auto"               # on a Ray cluster's head node
# lr-head = 0.0025               # any training flag too
"""


def render(store: str, storage: str, name: str) -> str:
    return TEMPLATE.format(store=json.dumps(store), storage=json.dumps(storage),
                           name=json.dumps(name))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep init",
                                description="Write a starter cxr-sweep.toml in this folder.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="", help="the store location (default: left empty)")
    p.add_argument("--storage", default="", help="where sweeps live (default: left empty)")
    p.add_argument("--name", default="thesis", help="the sweep's name (default: thesis)")
    p.add_argument("--dir", default=".", help="the folder to write it in (default: this one)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = os.path.join(args.dir, CONFIG_FILE)
    if os.path.exists(path) and not args.force:
        raise UserError(f"{path} exists; edit it, or pass --force to replace it")
    os.makedirs(args.dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(render(args.store, args.storage, args.name))
    print(f"wrote {path}; check it with python -m orchestrator.sweep --dry-run")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="orchestrator.sweep init"))
