"""The fake multinode cluster's head, attacked as an outsider on the network would: a client without
the token, or with a wrong one, is refused; one with the cluster's token is admitted, so the
refusal is the token's doing. The token file and its folder are private to their owner."""
from __future__ import annotations

import os
import stat

import pytest

from test_auth import client
from test_fake_cluster import cluster  # noqa: F401  (the fixture: a fake multinode cluster of our own)

pytestmark = pytest.mark.slow


def test_fake_cluster_head_refuses_a_client_without_the_token(tmp_path, cluster):  # noqa: F811
    address, env, _ = cluster
    token = env["RAY_AUTH_TOKEN_PATH"]
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(token)).st_mode) == 0o700
    outsider_home = str(tmp_path / "outsider")
    os.makedirs(outsider_home)

    without = client(address, outsider_home, token_path=None)
    assert without.returncode == 3 and "REFUSED" in without.stdout, without.stdout + without.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    os.chmod(wrong, 0o600)
    guessed = client(address, outsider_home, token_path=str(wrong))
    assert guessed.returncode == 3 and "REFUSED" in guessed.stdout, guessed.stdout + guessed.stderr
    admitted = client(address, outsider_home, token_path=token)
    assert admitted.returncode == 0 and "CONNECTED" in admitted.stdout, admitted.stdout + admitted.stderr
    assert not os.path.exists(os.path.join(outsider_home, ".ray", "auth_token"))
