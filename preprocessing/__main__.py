"""``python -m preprocessing``: a dataset's label tables + images -> a Parquet store of pre-resized images.

Each subcommand lives in its own module, which provides ``HELP`` (one line), ``EPILOG`` (examples),
``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from common.cli import HelpFormatter, run_cli

SUBCOMMANDS = {
    "stats": "preprocessing.stats",
    "phantom": "preprocessing.phantom_cli",
    "build": "preprocessing.build",
    "verify": "preprocessing.verify",
}

EPILOG = """examples:
  python -m preprocessing phantom --out demo/phantom --studies 200
  python -m preprocessing stats --csv demo/phantom/train.csv --csv demo/phantom/valid.csv
  python -m preprocessing build --image-root demo/phantom --csv demo/phantom/train.csv \\
      --csv demo/phantom/valid.csv --out demo/store --resolutions 160,240,320,400,480
  python -m preprocessing verify demo/store
  python -m preprocessing stats --dataset nih --csv Data_Entry_2017_v2020.csv.gz
  python -m preprocessing build --dataset nih --image-root /data/nih --csv /data/nih/Data_Entry_2017_v2020.csv \\
      --out /data/nih-store
  python -m bench.store_bench --images 40        # (from the repository) the builder vs the naive path
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m preprocessing", description=__doc__.split("\n")[0],
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=module.EPILOG,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="preprocessing"))
