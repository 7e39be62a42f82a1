"""``python -m preprocessing verify STORE``: check every shard against the manifest."""
from __future__ import annotations

import sys

from common import storage
from common.cli import EXIT_FAILURE
from preprocessing.manifest import manifest_hash, read_manifest, verify_store

HELP = "Check a store: every shard's existence, size, sha256 and row count against manifest.json."
EPILOG = """examples:
  python -m preprocessing verify demo/store
  python -m preprocessing verify demo/store --resolution 320
  python -m preprocessing verify 's3://bucket/stores/chexpert?endpoint_override=127.0.0.1:9000&scheme=http'

Exit status 0 when intact, 1 with one line per problem (naming the file) otherwise.
"""


def add_arguments(parser) -> None:
    parser.add_argument("store", metavar="STORE", help="store location (path or s3://...)")
    parser.add_argument("--resolution", type=int, default=None, help="check only this resolution's shards")


def run(args) -> int:
    problems = verify_store(args.store, resolution=args.resolution)
    if problems:
        for p in problems:
            print(f"verify: {p}", file=sys.stderr)
        print(f"verify: {storage.display(args.store)}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_FAILURE
    manifest = read_manifest(args.store)
    checked = [s for s in manifest["shards"] if args.resolution is None or s["resolution"] == args.resolution]
    c = manifest["counts"]
    print(f"{storage.display(args.store)}: OK ({manifest['dataset']}), {len(checked)} shard files, "
          f"{sum(s['bytes'] for s in checked):,} bytes; rows in {c['rows_in']} = stored {c['stored']} + "
          f"rejected {c['rejected']}; manifest hash {manifest_hash(manifest)}")
    return 0
