"""Fill ``.whl/`` with the Python 3.12 x86-64 wheels the GPU check needs on a machine without network.

The GPU machines this project borrows have torch, torchvision, numpy, pandas, pyarrow, scikit-learn
and pillow, but not ``ray`` or ``efficientnet-pytorch``; everything that travels to them must fit in
64 MiB. The ray 2.60.0 wheel alone is ~76 MiB, of which ~31 MiB is the Java worker jar and ~2.4 MiB the
dashboard's web client: neither is used by a Python Tune run with the dashboard off, so this script
rewrites the wheel without them (its RECORD updated, so pip installs it normally).

Run here (with network to PyPI), in the repository root::

    .venv/bin/python bench/device_wheels.py            # -> .whl/*.whl, ~46 MiB
    bash bench/gpu_check.sh                            # on the GPU box: installs .whl, runs the check
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import zipfile

#: ray's and ray[tune]'s requirements that the device image lacks (compared against its package
#: list); versions as in this project's .venv so that both sides run the same code.
WHEELS = [
    "ray==2.60.0",
    "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0",
    "rpds-py==2026.9.1", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "typing_extensions==4.16.0", "tensorboardX==2.6.5",
]
#: Only an sdist exists on PyPI: built into a pure-Python wheel here.
SDIST_WHEELS = ["efficientnet-pytorch==0.7.1"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
#: Members of the ray wheel a Python-only run with the dashboard off never reads.
RAY_DROP_PREFIXES = ("ray/jars/", "ray/dashboard/client/build/")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def trim_wheel(path: str, drop_prefixes=RAY_DROP_PREFIXES) -> tuple[int, int]:
    """Rewrite a wheel in place without the members under ``drop_prefixes``; returns (old, new) bytes."""
    old_size = os.path.getsize(path)
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = []
        for info in src.infolist():
            if info.filename.startswith(drop_prefixes) or info.filename == record_name:
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            kept.append(f"{info.filename},{_record_hash(data)},{len(data)}")
        kept.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(kept) + "\n")
    os.replace(tmp, path)
    return old_size, os.path.getsize(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("::")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=".whl", help="folder for the wheels (ignored by git)")
    args = parser.parse_args(argv)
    os.makedirs(args.dest, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    platform_flags = [f for p in PLATFORMS for f in ("--platform", p)]
    for req in WHEELS:
        subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                              "--implementation", "cp", *platform_flags, "-d", args.dest, req], check=True)
    for req in SDIST_WHEELS:
        subprocess.run(pip + ["wheel", "-q", "--no-deps", req, "-w", args.dest], check=True)
    for name in sorted(os.listdir(args.dest)):
        if name.startswith("ray-") and name.endswith(".whl"):
            with zipfile.ZipFile(os.path.join(args.dest, name)) as z:
                trimmed = not any(n.startswith(RAY_DROP_PREFIXES) for n in z.namelist())
            if not trimmed:
                old, new = trim_wheel(os.path.join(args.dest, name))
                print(f"trimmed {name}: {old / 2**20:.1f} MiB -> {new / 2**20:.1f} MiB")
    total = sum(os.path.getsize(os.path.join(args.dest, n)) for n in os.listdir(args.dest))
    print(f"{args.dest}: {len(os.listdir(args.dest))} wheels, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
