"""The embedded Ray's security claims, by behaviour: a client without the token is refused (and one
with it admitted, so the refusal is the token's doing), and no token file anywhere is readable by
others while the instance runs or after it stopped."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from orchestrator.local_ray import TOKEN_FILE, ray_session
from test_sweep_helpers import ray_env, refresh_ray_auth

CLIENT = """
import sys
import ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
except Exception as exc:
    print("REFUSED", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    sys.exit(3)
print("CONNECTED", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def client(address: str, home: str, token_path: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("CXR_RAY_RUN_DIR", "TMPDIR")}
    # Ray retries a refused connection for ~20 s; 3 attempts say the same. The admitted client runs
    # with the same setting, so a refusal stays the token's doing.
    env.update(HOME=home, RAY_USAGE_STATS_ENABLED="0", TMPDIR=home, RAY_gcs_server_port_wait_time_s="3")
    if token_path:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
    return subprocess.run([sys.executable, "-c", CLIENT, address], env=env, capture_output=True,
                          text=True, timeout=120)


def token_files(*roots: str) -> list[str]:
    found = []
    for root in roots:
        for folder, _, names in os.walk(root):
            found += [os.path.join(folder, n) for n in names if "token" in n]
    return found


@pytest.fixture
def ray_files():
    mp = pytest.MonkeyPatch()
    base = ray_env(mp)
    mp.delenv("RAY_AUTH_TOKEN_PATH")     # as a user's shell: no token set up beforehand
    mp.delenv("RAY_AUTH_MODE")
    refresh_ray_auth()
    yield base
    mp.undo()
    refresh_ray_auth()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_embedded_instance_refuses_a_client_without_the_token(ray_files, tmp_path):
    outsider_home = str(tmp_path / "outsider")
    os.makedirs(outsider_home)
    with ray_session(None, num_cpus=1, num_gpus=0) as handle:
        token = os.path.join(handle.run_dir, TOKEN_FILE)
        assert os.path.exists(token)
        # every token file in the run dir and in ~ (HOME is ray_files) is private to its owner
        files = token_files(handle.run_dir, ray_files)
        assert token in files
        for path in files:
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, (path, oct(os.stat(path).st_mode))
        assert not os.path.exists(os.path.join(ray_files, ".ray", "auth_token"))
        assert stat.S_IMODE(os.stat(handle.run_dir).st_mode) == 0o700

        without = client(handle.address, outsider_home, token_path=None)
        assert without.returncode == 3 and "REFUSED" in without.stdout, without.stdout + without.stderr
        wrong = tmp_path / "wrong-token"
        wrong.write_text("0" * 64)
        os.chmod(wrong, 0o600)
        guessed = client(handle.address, outsider_home, token_path=str(wrong))
        assert guessed.returncode == 3 and "REFUSED" in guessed.stdout, guessed.stdout + guessed.stderr
        admitted = client(handle.address, outsider_home, token_path=token)
        assert admitted.returncode == 0 and "CONNECTED" in admitted.stdout, admitted.stdout + admitted.stderr
        assert not os.path.exists(os.path.join(outsider_home, ".ray", "auth_token"))
    assert not os.path.exists(token)                   # worthless once the instance is gone
    assert [p for p in token_files(ray_files) if stat.S_IMODE(os.stat(p).st_mode) & 0o077] == []
