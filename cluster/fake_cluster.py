"""Start and stop the one-machine cluster of cluster/fake_multinode.yaml, and nothing else.

    python cluster/fake_cluster.py start --dir /tmp/cxrfc      # prints the address and env to use
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/cxrfc/ray_auth_token \\
        python -m orchestrator.sweep --address ADDRESS ...
    python cluster/fake_cluster.py stop --dir /tmp/cxrfc

`start` runs `RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config=...` in a new
session, with token authentication (a fresh token in DIR) and every Ray file below DIR (DIR is
made 0700; keep it short: Ray's Unix socket paths below it are limited to ~107 bytes). The head
gets the head type's resources from the YAML (0 GPUs), so GPU work makes the autoscaler start
fake GPU workers: local Ray processes with the worker type's resources.

`stop` cannot use `ray stop` (it stops every Ray instance on the machine, other users' too), and
stopping the head is not enough: the fake workers are started by the autoscaler (a child of the
head) and outlive it, re-parented to init. Every process of the cluster stays in the session that
`start` created, whose id is the head's pid, and nothing else is in it; so `stop` sends SIGTERM to
the head, then SIGTERM and SIGKILL to whatever is left in that session, by pid.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_YAML = os.path.join(HERE, "fake_multinode.yaml")
MAX_DIR_LEN = 40        # + "/ray/session_<date>_<pid>/sockets/plasma_store" stays under 107 bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def client_env(run_dir: str, base: dict | None = None) -> dict:
    """The environment a driver (the sweep) needs to join: token auth with this cluster's token."""
    env = dict(os.environ if base is None else base)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.path.join(run_dir, "ray_auth_token"),
                "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("RAY_ADDRESS", None)
    return env


def start(run_dir: str, config: str = FAKE_YAML, port: int | None = None, timeout: float = 120.0,
          env: dict | None = None) -> dict:
    """Start the cluster; returns {"address", "pid", "session_dir_glob", "log"} (also written to
    DIR/state.json) and "process", the head's Popen."""
    run_dir = os.path.abspath(run_dir)
    if len(run_dir) > MAX_DIR_LEN:
        raise ValueError(f"--dir {run_dir}: longer than {MAX_DIR_LEN} characters (Ray's socket paths "
                         f"below it would exceed the 107-byte limit); use e.g. /tmp/cxrfc")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)
    if os.path.exists(os.path.join(run_dir, "state.json")):
        raise ValueError(f"{run_dir} already holds a cluster (state.json); stop it first")
    token = os.path.join(run_dir, "ray_auth_token")
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))

    from ray._private.services import get_node_ip_address
    ip = get_node_ip_address()
    port = port or free_port()
    with open(config) as f:
        cfg = yaml.safe_load(f)
    cfg["provider"]["gcs_address"] = f"{ip}:{port}"      # where the fake workers join
    config_path = os.path.join(run_dir, "fake_multinode.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(cfg, f)
    head = cfg["available_node_types"]["ray.head.default"]["resources"]

    env = client_env(run_dir, env)
    env.update({"RAY_TMPDIR": run_dir, "TMPDIR": run_dir, "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    log_path = os.path.join(run_dir, "head.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [ray, "start", "--head", f"--port={port}", f"--node-ip-address={ip}",
             f"--num-cpus={head.get('CPU', 1)}", f"--num-gpus={head.get('GPU', 0)}",
             "--include-dashboard=false", f"--dashboard-port={free_port()}",
             f"--autoscaling-config={config_path}", "--block"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=run_dir)
    state = {"address": f"{ip}:{port}", "pid": proc.pid, "log": log_path,
             "session_dir_glob": os.path.join(run_dir, "ray", "session_*")}
    with open(os.path.join(run_dir, "state.json"), "w") as f:
        json.dump(state, f)
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, errors="replace") as f:
            text = f.read()
        if "Ray runtime started" in text:
            return dict(state, process=proc)
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc.pid)
            os.remove(os.path.join(run_dir, "state.json"))
            raise RuntimeError(f"ray start did not come up (see {log_path}):\n{text[-2000:]}")
        time.sleep(0.5)


def session_pids(sid: int) -> dict[int, str]:
    """pid -> command of every live (non-zombie) process in session ``sid``, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue                                   # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": state ppid pgrp session
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(entry)] = cmd or stat[stat.index("(") + 1:stat.rindex(")")]
    return found


def stop(pid: int, grace: float = 30.0) -> dict[int, str]:
    """Stop the session led by ``pid`` (a process started with start_new_session=True) and return
    what is still alive afterwards (nothing, normally)."""
    # Signal ``pid`` only while it still leads its own session: a pid that exited may have been
    # reused by an unrelated process, which would not be a session leader with that id.
    if pid in session_pids(pid):
        try:
            os.kill(pid, signal.SIGTERM)               # the head drains and stops its own processes
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and pid in session_pids(pid):
                time.sleep(0.2)
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):       # then whatever it left: the fake workers
        left = session_pids(pid)
        if not left:
            return {}
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while session_pids(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return session_pids(pid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python cluster/fake_cluster.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start the fake cluster")
    s.add_argument("--dir", required=True, help=f"its folder (at most {MAX_DIR_LEN} characters)")
    s.add_argument("--config", default=FAKE_YAML, help="the fake_multinode YAML")
    s.add_argument("--port", type=int, default=None, help="GCS port (default: a free one)")
    t = sub.add_parser("stop", help="stop the fake cluster started in --dir, and nothing else")
    t.add_argument("--dir", required=True)
    args = p.parse_args(argv)
    run_dir = os.path.abspath(args.dir)
    if args.cmd == "start":
        try:
            state = start(run_dir, args.config, args.port)
        except (ValueError, RuntimeError) as exc:
            print(f"fake_cluster: error: {exc}", file=sys.stderr)
            return 2
        print(f"fake cluster up at {state['address']} (head pid {state['pid']}); in the shells that use it:\n"
              f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={run_dir}/ray_auth_token\n"
              f"  python -m orchestrator.sweep --address {state['address']} ...\n"
              f"stop it with: python cluster/fake_cluster.py stop --dir {run_dir}")
        return 0
    try:
        with open(os.path.join(run_dir, "state.json")) as f:
            state = json.load(f)
    except FileNotFoundError:
        print(f"fake_cluster: error: no cluster state in {run_dir} (state.json)", file=sys.stderr)
        return 2
    left = stop(state["pid"])
    if left:
        print(f"fake_cluster: error: still alive: {left}", file=sys.stderr)
        return 1
    os.remove(os.path.join(run_dir, "state.json"))
    print(f"stopped the fake cluster of {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
