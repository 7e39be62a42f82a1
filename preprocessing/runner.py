"""Where the shards of a build run: one after another in this process, or as Ray tasks.

Both yield each shard's done-record as it finishes; the build does the rest (docs/store.md).
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from typing import Callable, Iterator

import preprocessing


def run_in_process(specs: list, build_shard: Callable[[object], dict]) -> Iterator[dict]:
    for spec in specs:
        yield build_shard(spec)


def run_on_ray(specs: list, build_shard: Callable[[object], dict], address: str | None,
               num_cpus: int | None) -> Iterator[dict]:
    """Run shards as Ray tasks; starts a private local Ray unless one is running or ``address`` is given."""
    import ray

    started, tmp, saved_env = False, None, {}
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:
            # Embedded Ray: its session files and auth token live in a private (0700) folder.
            # Its token is private too (Ray would otherwise write ~/.ray/auth_token, mode 0644).
            tmp = tempfile.mkdtemp(prefix="cxr-ray-")
            token = os.path.join(tmp, "auth_token")
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            overrides = {"RAY_AUTH_TOKEN_PATH": token}
            if "RAY_USAGE_STATS_ENABLED" not in os.environ:
                overrides["RAY_USAGE_STATS_ENABLED"] = "0"
            for var, value in overrides.items():
                saved_env[var] = os.environ.get(var)
                os.environ[var] = value
            here = os.path.dirname(os.path.dirname(os.path.abspath(preprocessing.__file__)))
            pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
            ray.init(num_cpus=num_cpus, _temp_dir=os.path.join(tmp, "r"), include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(build_shard)
        pending = [task.remote(s) for s in specs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()
            for var, value in saved_env.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
