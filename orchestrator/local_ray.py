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

A killed driver (SIGKILL, OOM killer) runs no ``finally``: Ray's own fate-sharing stops the GCS and
raylet, but its dashboard and runtime-env agents lingered about a minute, and the token stayed on
disk. So the embedded instance gets a watchdog: a small process (``python -m
orchestrator.local_ray watchdog``) holding a pipe from the driver and its pid. When the pipe closes
or the pid stops naming the driver, without the driver's "done" line, the driver died: the
watchdog ends every process that carries this run's marker (``CXR_RAY_RUN_DIR=<run dir>`` in its
environment, inherited by all of Ray's processes of this instance, nothing else) or runs Ray's
code with a file open inside the run directory (its logs are there), removes the
token and the run directory, and exits. Its log (``<run dir>.watchdog.log``) is deleted when all
went well and kept as the evidence when not. Run directories of earlier drivers that are gone are
removed when the next one starts.

Ctrl-C: Tune's own SIGINT handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``), so the
KeyboardInterrupt reaches the sweep, which records the running trials as interrupted; Tune's
"Resume experiment with: Tuner.restore(...)" advice, which contradicts ours (re-run the same
command), is filtered out of its log.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from common.cli import UserError

#: How long to wait for a cluster address to accept a TCP connection.
CONNECT_TIMEOUT_S = 5.0

#: Environment variables the embedded instance sets while it runs (restored afterwards).
_ENV_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_USAGE_STATS_ENABLED", "CXR_RAY_RUN_DIR",
             "TUNE_DISABLE_SIGINT_HANDLER")
#: The environment marker every process of one embedded instance inherits.
RUN_MARKER = "CXR_RAY_RUN_DIR"
RUN_DIR_PREFIX = "cxr-ray-"
#: The driver's pid, written into its run directory (old run directories of dead drivers go).
DRIVER_PID_FILE = "driver.pid"
TOKEN_FILE = "auth_token"
#: Seconds the watchdog gives processes to exit after SIGTERM before SIGKILL.
TERM_GRACE_S = 2.0


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


def make_run_dir(base: str | None = None, prefix: str = RUN_DIR_PREFIX) -> str:
    """A fresh private (0700) directory for one embedded instance.

    Kept short on purpose: Ray puts Unix sockets below it and socket paths are limited to ~107
    bytes. ``CXR_RAY_DIR`` chooses the parent; default the system temp dir.
    """
    base = base or os.environ.get("CXR_RAY_DIR") or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    remove_stale_run_dirs(base, prefix)
    run_dir = tempfile.mkdtemp(prefix=prefix, dir=base)   # mkdtemp creates it with mode 0700
    os.chmod(run_dir, 0o700)
    with open(os.path.join(run_dir, DRIVER_PID_FILE), "w") as f:
        f.write(str(os.getpid()))
    return run_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_run_dirs(base: str, prefix: str = RUN_DIR_PREFIX) -> list[str]:
    """Remove run directories in ``base`` whose driver is gone and no process uses any more.

    Only directories we made (our prefix, owned by this user, with a driver pid file) qualify."""
    removed = []
    for name in os.listdir(base) if os.path.isdir(base) else []:
        path = os.path.join(base, name)
        pid_file = os.path.join(path, DRIVER_PID_FILE)
        try:
            if (not name.startswith(prefix) or os.stat(path).st_uid != os.getuid()
                    or not os.path.isfile(pid_file)):
                continue
            with open(pid_file) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid <= 0 or _pid_alive(pid) or processes_of(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def processes_of(run_dir: str) -> list[int]:
    """Pids of this user's processes of the instance in ``run_dir``: those carrying its marker in
    their environment, and Ray's own programs (our Python, Ray's binaries) holding a file open
    inside it (their logs are there), so a process whose environment reads back empty is still
    found, while a user's ``tail -f`` on one of those logs is not."""
    needle = f"{RUN_MARKER}={run_dir}\0".encode()
    inside = run_dir.rstrip(os.sep) + os.sep
    programs = _ray_programs()
    found = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read() + b"\0"
        except OSError:
            env = b""
        if needle in env or (_is_program(int(pid), programs) and _has_open_file_in(int(pid), inside)):
            found.append(int(pid))
    return found


def _ray_programs() -> tuple[str, ...]:
    """What a process of the instance runs: this Python, or a binary inside Ray's package."""
    import importlib.util
    places = [os.path.realpath(sys.executable)]
    with contextlib.suppress(ImportError, ValueError, AttributeError, TypeError):
        places += [os.path.realpath(p) + os.sep
                   for p in importlib.util.find_spec("ray").submodule_search_locations]
    return tuple(places)


def _is_program(pid: int, programs: tuple[str, ...]) -> bool:
    try:
        exe = os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    return any(exe == p or (p.endswith(os.sep) and exe.startswith(p)) for p in programs)


def _has_open_file_in(pid: int, prefix: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
    return False


def stop_processes(pids: Sequence[int], grace: float = TERM_GRACE_S) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while sig == signal.SIGTERM and time.time() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _pid_alive(p)]
        if not pids:
            return


def clean_up_after(run_dir: str, settle: float = 60.0) -> list[int]:
    """What the watchdog does when the driver died: end the instance's processes, again while any
    are left (a dying raylet may still start a worker or an agent), then remove the token and the
    run directory. Returns the pids still alive after ``settle`` seconds (none, normally)."""
    deadline = time.time() + settle
    quiet_scans = 0
    pids: list[int] = []
    while time.time() < deadline and quiet_scans < 3:
        pids = processes_of(run_dir)
        if pids:
            quiet_scans = 0
            stop_processes(pids)
        else:
            quiet_scans += 1
            time.sleep(0.3)
    with contextlib.suppress(OSError):
        os.remove(os.path.join(run_dir, TOKEN_FILE))
    shutil.rmtree(run_dir, ignore_errors=True)
    return processes_of(run_dir)


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks (``/proc/PID/stat`` field 22), or None when it is
    gone or a zombie: with the pid it names one process, whatever reuses the pid later."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def watch(run_dir: str, driver_pid: int, stream=None, poll: float = 0.5) -> int:
    """The watchdog's loop: clean up when the driver is gone without having said "done".

    Two signs that it is gone, whichever comes first: its pipe closes, or its pid stops naming the
    process that started us (a pipe end inherited by some other process would keep the pipe open)."""
    fd = (stream or sys.stdin.buffer).fileno()
    ticks = _start_ticks(driver_pid)
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], poll)
        if ready:
            chunk = os.read(fd, 64)
            if not chunk:
                break
            data += chunk
            continue
        if ticks is None or _start_ticks(driver_pid) != ticks:
            break
    if b"done" in data:
        return 0
    log(f"driver {driver_pid} gone; ending the processes of {run_dir}")
    left = clean_up_after(run_dir)
    if left:
        log(f"still running after the clean-up: {left}")
        return 1
    log("clean-up done")
    return 0


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} watchdog: {message}", file=sys.stderr, flush=True)


def watchdog_log_path(run_dir: str) -> str:
    """The watchdog's log, next to (not in) the run directory it removes; deleted when all went well."""
    return run_dir.rstrip(os.sep) + ".watchdog.log"


def start_watchdog(run_dir: str) -> subprocess.Popen:
    """The watchdog process of one embedded instance (its own session: a Ctrl-C to the driver's
    terminal does not reach it, and it outlives the driver by design)."""
    env = {k: v for k, v in os.environ.items() if k != RUN_MARKER}   # it must not end itself
    with open(watchdog_log_path(run_dir), "ab") as log_file:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.local_ray", "watchdog", run_dir,
                                 str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log_file,
                                start_new_session=True, env=env,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stop_watchdog(proc: subprocess.Popen) -> None:
    """Tell the watchdog the driver ends normally (it then exits and removes its log)."""
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.write(b"done\n")
        proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class _DropTuneRestoreAdvice(logging.Filter):
    """Tune's 'Resume experiment with: Tuner.restore(...)' contradicts the sweep's own advice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


_ADVICE_FILTER = _DropTuneRestoreAdvice()


def _write_token(run_dir: str) -> str:
    path = os.path.join(run_dir, TOKEN_FILE)
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

    logging.getLogger("ray.tune.tune").addFilter(_ADVICE_FILTER)
    if ray.is_initialized():
        yield RayHandle(mode="existing", address=_gcs_address(ray), resources=ray.cluster_resources())
        return

    address = cluster_address(address)
    if address is not None:
        check_reachable(address)
        saved_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=not quiet)
        except Exception as exc:  # ConnectionError, AuthenticationError, version mismatch, ...
            raise UserError(f"cannot join the Ray cluster at {address}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        try:
            yield RayHandle(mode="cluster", address=address, resources=ray.cluster_resources())
        finally:
            ray.shutdown()   # disconnects this driver; the cluster keeps running
            if saved_sigint is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_sigint
        return

    run_dir = make_run_dir(run_dir_base)
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = _write_token(run_dir)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    _reset_token_cache()
    watchdog = start_watchdog(run_dir)
    os.environ[RUN_MARKER] = run_dir   # after the watchdog started: Ray's processes inherit it
    try:
        ray.init(**init_kwargs_embedded(run_dir, num_cpus, num_gpus, quiet))
        yield RayHandle(mode="embedded", address=_gcs_address(ray), run_dir=run_dir,
                        resources=ray.cluster_resources())
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_watchdog(watchdog)
        with contextlib.suppress(OSError):   # the token is worthless once the instance is gone
            os.remove(os.path.join(run_dir, TOKEN_FILE))
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.local_ray watchdog RUN_DIR DRIVER_PID`` (started by ray_session only)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] != "watchdog" or not argv[2].isdigit():
        print("usage: python -m orchestrator.local_ray watchdog RUN_DIR DRIVER_PID "
              "(started by the sweep)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_dir = os.path.abspath(argv[1])
    status = watch(run_dir, int(argv[2]))
    if status == 0:
        with contextlib.suppress(OSError):
            os.remove(watchdog_log_path(run_dir))
    return status


if __name__ == "__main__":
    sys.exit(main())
