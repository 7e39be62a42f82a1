"""Which Ray the sweep runs on: a cluster it joins, or a fresh local instance it owns.

Embedded default (no ``--address`` and no ``RAY_ADDRESS``): start a NEW local Ray instance for
this run only. Its temp files, session logs and auth token live in one run directory (mode 0700;
Ray's own temp dir, which Ray makes 0777, sits inside it as ``r/``),
token authentication is on with a fresh token, the dashboard is off, and at the end exactly this
instance is shut down (``ray.shutdown()`` stops the processes this driver started, nothing else).

Why ``address="local"`` and an explicit ``_temp_dir``: ``ray.init()`` with no address connects to
whatever cluster ``/tmp/ray/ray_current_cluster`` names when one is running, so a stale instance
left by a killed run (or someone else's ``ray start``) would capture the sweep. ``"local"`` always
starts a new instance and never reads that file.

Joining (``--address HOST:PORT`` / ``RAY_ADDRESS``): the address is checked with a short TCP
connect first, so an unreachable cluster is one clear error line before anything starts instead
of Ray's long retry loop.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

from common.cli import UserError

#: How long to wait for a cluster address to accept a TCP connection.
CONNECT_TIMEOUT_S = 5.0

#: Environment variables the embedded instance sets while it runs (restored afterwards).
_ENV_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_USAGE_STATS_ENABLED")


@dataclass
class RayHandle:
    """What the sweep needs to know about the Ray it runs on."""
    mode: str                      # "embedded" or "cluster"
    address: str                   # GCS address
    run_dir: str | None = None     # embedded only: temp files, logs, token
    resources: dict = field(default_factory=dict)

    @property
    def total_gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))

    @property
    def total_cpus(self) -> float:
        return float(self.resources.get("CPU", 0.0))


def cluster_address(address: str | None) -> str | None:
    """The address to join: the flag, else ``RAY_ADDRESS``, else None (= embedded)."""
    address = (address or "").strip() or os.environ.get("RAY_ADDRESS", "").strip()
    if address == "local":   # Ray's own spelling of "start a new local instance"
        return None
    return address or None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise a UserError naming the address unless its host:port accepts a TCP connection.

    ``auto`` (the cluster started by ``ray start`` on this machine) is left to Ray to find.
    """
    if address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port_text = target.rpartition(":")
    if not sep or not host:
        raise UserError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        port = int(port_text)
    except ValueError:
        raise UserError(f"--address {address!r}: port {port_text!r} is not a number") from None
    host = host.strip("[]")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} "
                        f"({exc.strerror or exc}); is it running (`ray up` / `ray start --head`)?"
                        ) from None


def make_run_dir(base: str | None = None, prefix: str = "cxr-ray-") -> str:
    """A fresh private (0700) directory for one embedded instance.

    Kept short on purpose: Ray puts Unix sockets below it and socket paths are limited to ~107
    bytes. ``CXR_RAY_DIR`` chooses the parent; default the system temp dir.
    """
    base = base or os.environ.get("CXR_RAY_DIR") or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix=prefix, dir=base)   # mkdtemp creates it with mode 0700
    os.chmod(run_dir, 0o700)
    return run_dir


def _write_token(run_dir: str) -> str:
    path = os.path.join(run_dir, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _reset_token_cache() -> None:
    # Ray caches its config (auth mode) and the token it loaded when first imported; re-read both
    # after changing the environment (what ray's own _enable_token_auth does).
    with contextlib.suppress(Exception):
        from ray._raylet import AuthenticationTokenLoader, Config
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def init_kwargs_embedded(run_dir: str, num_cpus: int | None, num_gpus: int | None,
                         quiet: bool = True) -> dict:
    """The ray.init arguments for a new local instance (never 'auto', never the default /tmp/ray)."""
    # Ray makes its temp dir world-writable (0777); keeping it one level below our 0700 run
    # directory is what makes the sockets, logs and session files private.
    ray_tmp = os.path.join(run_dir, "r")
    os.makedirs(ray_tmp, exist_ok=True)
    kwargs = dict(address="local", _temp_dir=ray_tmp, include_dashboard=False,
                  configure_logging=True, logging_level="WARNING", log_to_driver=not quiet)
    if num_cpus is not None:
        kwargs["num_cpus"] = int(num_cpus)
    if num_gpus is not None:
        kwargs["num_gpus"] = int(num_gpus)
    return kwargs


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                num_gpus: int | None = None, run_dir_base: str | None = None,
                quiet: bool = True) -> Iterator[RayHandle]:
    """Join ``address`` (or ``RAY_ADDRESS``), or start and later stop a private local instance.

    If Ray is already initialised in this process (a test fixture, a notebook), it is used as is
    and left running: we stop only what we start.
    """
    import ray

    if ray.is_initialized():
        yield RayHandle(mode="existing", address=_gcs_address(ray), resources=ray.cluster_resources())
        return

    address = cluster_address(address)
    if address is not None:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=not quiet)
        except Exception as exc:  # ConnectionError, AuthenticationError, version mismatch, ...
            raise UserError(f"cannot join the Ray cluster at {address}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        try:
            yield RayHandle(mode="cluster", address=address, resources=ray.cluster_resources())
        finally:
            ray.shutdown()   # disconnects this driver; the cluster keeps running
        return

    run_dir = make_run_dir(run_dir_base)
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = _write_token(run_dir)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _reset_token_cache()
    try:
        ray.init(**init_kwargs_embedded(run_dir, num_cpus, num_gpus, quiet))
        yield RayHandle(mode="embedded", address=_gcs_address(ray), run_dir=run_dir,
                        resources=ray.cluster_resources())
    finally:
        if ray.is_initialized():
            ray.shutdown()
        with contextlib.suppress(OSError):   # the token is worthless once the instance is gone
            os.remove(os.path.join(run_dir, "auth_token"))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_token_cache()


def _gcs_address(ray) -> str:
    with contextlib.suppress(Exception):
        return ray.get_runtime_context().gcs_address
    return ""
