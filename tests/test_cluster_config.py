"""cluster.yaml and cluster/fake_multinode.yaml against Ray's own schema, and cluster.yaml's security.

Set CXR_CLUSTER_YAML=/path/to/your/filled-in/cluster.yaml to run the same checks on your copy
before `ray up` (docs/cluster.md).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex

import pytest
import yaml

ray_util = pytest.importorskip("ray.autoscaler._private.util")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
FAKE_YAML = os.path.join(REPO, "cluster", "fake_multinode.yaml")
AWS_DIR = os.path.join(REPO, "cluster", "aws")
REMOTE_HOME = "/home/ubuntu"      # auth.ssh_user's home on the AMI

CONFIGS = [CLUSTER_YAML] + ([os.environ["CXR_CLUSTER_YAML"]] if os.environ.get("CXR_CLUSTER_YAML") else [])
AWS_KEY_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                       # access key ids
    re.compile(r"aws_secret_access_key|aws_access_key_id|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN", re.I),
]


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def validate_with_ray(config: dict) -> dict:
    """What `ray up` does first: fill in the provider's defaults, then check against ray-schema.json."""
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)
    return prepared


def ray_start(commands: list[str]) -> list[str]:
    """The shell words of the `ray start` command(s), env assignments included."""
    found = []
    for cmd in commands:
        for part in cmd.split(";"):
            words = shlex.split(part)
            if "ray" in words and "start" in words[words.index("ray"):]:
                found.append(words)
    return found


def env_of(words: list[str]) -> dict:
    env = {}
    for w in words[:words.index("ray")]:
        if "=" in w and re.match(r"^[A-Z_][A-Z0-9_]*=", w):
            k, v = w.split("=", 1)
            env[k] = v
    return env


def is_outside_repo(local_path: str) -> bool:
    path = os.path.realpath(os.path.expanduser(local_path))
    return os.path.isabs(os.path.expanduser(local_path)) and not (
        path == REPO or path.startswith(REPO + os.sep))


def security_problems(config: dict, text: str) -> list[str]:
    """Every way ``config`` (and its raw ``text``, comments included, for keys) breaks the cluster's security rules; [] when none."""
    problems = []
    values = json.dumps(config)          # comments may name 0.0.0.0 (to warn against it); values not
    if "0.0.0.0" in values or "::/0" in values:
        problems.append("'0.0.0.0' or '::/0' appears in a value")
    for pattern in AWS_KEY_PATTERNS:
        if pattern.search(text):
            problems.append(f"AWS credentials in the file ({pattern.pattern})")

    mounts = config.get("file_mounts") or {}
    token_paths = set()
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = ray_start(config.get(section) or [])
        if not starts:
            problems.append(f"{section}: no `ray start`")
        for words in starts:
            env = env_of(words)
            if env.get("RAY_AUTH_MODE") != "token":
                problems.append(f"{section}: `ray start` without RAY_AUTH_MODE=token")
            token = env.get("RAY_AUTH_TOKEN_PATH")
            if not token:
                problems.append(f"{section}: `ray start` without RAY_AUTH_TOKEN_PATH")
            else:
                token_paths.add(token.replace("$HOME", REMOTE_HOME).replace("~", REMOTE_HOME))
            if "RAY_AUTH_TOKEN" in env:
                problems.append(f"{section}: the token itself is written into the command")
            hosts = [w.split("=", 1)[1] for w in words if w.startswith("--dashboard-host=")]
            if "--head" in words and hosts != ["127.0.0.1"]:
                problems.append(f"{section}: the dashboard must bind --dashboard-host=127.0.0.1 (got {hosts})")
            if "--ray-client-server-port" in " ".join(words):
                problems.append(f"{section}: the Ray client server is not needed; do not open it")
    if len(token_paths) > 1:
        problems.append(f"head and workers use different token paths: {sorted(token_paths)}")
    for token in token_paths:
        if token not in mounts:
            problems.append(f"token {token} is not copied in by file_mounts")
        elif not is_outside_repo(mounts[token]):
            problems.append(f"token source {mounts[token]} is inside the repository (or relative)")
    for remote, local in mounts.items():
        if not is_outside_repo(local) and os.path.exists(os.path.join(os.path.expanduser(local), ".git")):
            problems.append(f"file_mounts {remote}: copies a git checkout; ship a bundle of the commit instead")

    provider = config.get("provider", {})
    if "security_group" in provider:
        problems.append("provider.security_group: the launcher adds SSH from 0.0.0.0/0 to groups it creates; "
                        "use SecurityGroupIds of the group made in docs/cluster.md")
    for name, node_type in config.get("available_node_types", {}).items():
        node_config = node_type.get("node_config", {})
        if provider.get("type") == "aws":
            if not node_config.get("SecurityGroupIds"):
                problems.append(f"{name}: no SecurityGroupIds (the launcher would create a group open to SSH from anywhere)")
            if not node_config.get("IamInstanceProfile"):
                problems.append(f"{name}: no IamInstanceProfile (S3 access must come from an instance role)")
    return problems


# --- schema ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS)
def test_cluster_yaml_passes_rays_schema(path):
    prepared = validate_with_ray(load(path))
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_fake_multinode_yaml_passes_rays_schema():
    config = load(FAKE_YAML)
    # prepare_config needs the provider's example.yaml, which the wheel lacks for fake_multinode;
    # the file is complete, so validate it as is (the integration test starts a cluster from it).
    ray_util.validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    head = config["available_node_types"][config["head_node_type"]]
    assert config["head_node_type"] == "ray.head.default"      # the provider's fixed head type
    assert head["resources"]["GPU"] == 0
    gpu_types = [t for n, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] > 0 for t in gpu_types)


def test_schema_check_is_real():
    bad = load(CLUSTER_YAML)
    bad["available_node_types"]["a10g.spot"]["resources"]["GPU"] = 0.5   # must be an integer
    with pytest.raises(Exception, match="integer"):
        validate_with_ray(bad)
    bad = load(CLUSTER_YAML)
    bad["idle_timeout"] = 5                                             # misspelt field
    with pytest.raises(Exception, match="idle_timeout"):
        validate_with_ray(bad)


# --- what the cluster is made of ----------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS)
def test_head_is_cpu_only_and_gpu_types_declare_resources(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    assert "InstanceMarketOptions" not in head["node_config"]            # the head is never spot
    instance_types = {t["node_config"]["InstanceType"] for t in types.values()}
    assert any(i.startswith("g5.") for i in instance_types)              # A10G
    assert any(i.startswith("p5.") for i in instance_types)              # H100
    for name, t in types.items():
        if name == config["head_node_type"]:
            continue
        assert {"CPU", "GPU"} <= set(t["resources"]), name
        assert t["min_workers"] >= 0 and t["max_workers"] <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["provider"]["cache_stopped_nodes"] is False          # spot cannot be stopped


@pytest.mark.parametrize("path", CONFIGS)
def test_every_spot_type_has_an_on_demand_fallback(path):
    types = load(path)["available_node_types"]
    spot = {n: t for n, t in types.items()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    assert spot
    for name, t in spot.items():
        fallbacks = [n for n, o in types.items() if n not in spot
                     and o["node_config"]["InstanceType"] == t["node_config"]["InstanceType"]
                     and o["resources"] == t["resources"]]
        if t["node_config"]["InstanceType"].startswith("c6i"):
            continue                              # the CPU build nodes: spot only, a build resumes
        assert fallbacks, f"{name} has no on-demand type of the same shape"
        assert all(types[f].get("priority", 0) < t["priority"] for f in fallbacks)


@pytest.mark.parametrize("path", CONFIGS)
def test_setup_installs_this_project_at_the_shipped_commit(path):
    config = load(path)
    setup = " && ".join(config["setup_commands"])
    assert "git -c advice.detachedHead=false clone -q ~/.cxr-sweep/cxr-sweep.bundle ~/cxr-sweep" in setup
    assert re.search(r"pip install -q -e ~/cxr-sweep ", setup)
    assert f"{REMOTE_HOME}/.cxr-sweep/cxr-sweep.bundle" in config["file_mounts"]
    if path == CLUSTER_YAML:
        assert json.dumps(config).count("REPLACE_BUCKET") == 1     # the bucket is named in one place
    for var in ("CXR_STORE", "CXR_STORAGE", "CXR_WEIGHTS_DIR", "CXR_CACHE_DIR"):
        assert f"export {var}=" in setup


# --- security ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS)
def test_cluster_yaml_security(path):
    assert security_problems(load(path), open(path).read()) == []


def _mutated(edit):
    config = load(CLUSTER_YAML)
    edit(config)
    return security_problems(config, yaml.safe_dump(config))


def test_security_checks_catch_each_mistake():
    def set_start(section, old, new):
        def edit(c):
            c[section] = [cmd.replace(old, new) for cmd in c[section]]
        return edit

    assert any("127.0.0.1" in p for p in _mutated(
        set_start("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")))
    assert any("RAY_AUTH_MODE" in p for p in _mutated(
        set_start("worker_start_ray_commands", "RAY_AUTH_MODE=token", "")))
    assert any("RAY_AUTH_TOKEN_PATH" in p for p in _mutated(
        set_start("head_start_ray_commands", "RAY_AUTH_TOKEN_PATH=$HOME/.cxr-sweep/ray_auth_token", "")))

    def token_in_repo(c):
        c["file_mounts"][f"{REMOTE_HOME}/.cxr-sweep/ray_auth_token"] = "ray_auth_token"
    assert any("inside the repository" in p for p in _mutated(token_in_repo))

    def no_group(c):
        del c["available_node_types"]["a10g.spot"]["node_config"]["SecurityGroupIds"]
    assert any("a10g.spot: no SecurityGroupIds" in p for p in _mutated(no_group))

    def keys(c):
        c["setup_commands"].append("export AWS_SECRET_ACCESS_KEY=abc")
    assert any("credentials" in p for p in _mutated(keys))


def test_security_group_rules_open_ssh_to_one_address_and_ray_only_inside():
    rules = json.load(open(os.path.join(AWS_DIR, "security-group-ingress.json")))
    ssh = [r for r in rules if r.get("FromPort") == 22]
    assert len(ssh) == 1 and ssh[0]["ToPort"] == 22 and ssh[0]["IpProtocol"] == "tcp"
    assert [r["CidrIp"] for r in ssh[0]["IpRanges"]] == ["REPLACE_SSH_CIDR"]   # set to YOUR.IP/32
    assert "Ipv6Ranges" not in ssh[0] and "UserIdGroupPairs" not in ssh[0]
    others = [r for r in rules if r is not ssh[0]]
    assert others and all(not r.get("IpRanges") and not r.get("Ipv6Ranges") and not r.get("PrefixListIds")
                          and [g["GroupId"] for g in r["UserIdGroupPairs"]] == ["REPLACE_SECURITY_GROUP"]
                          for r in others)                                 # only the group itself


def test_iam_policies_grant_the_bucket_and_launching_only():
    text = "".join(open(os.path.join(AWS_DIR, f)).read() for f in sorted(os.listdir(AWS_DIR)))
    for pattern in AWS_KEY_PATTERNS:
        assert not pattern.search(text)
    bucket = json.load(open(os.path.join(AWS_DIR, "bucket-access-policy.json")))
    resources = {r for s in bucket["Statement"] for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert resources == {"arn:aws:s3:::REPLACE_BUCKET", "arn:aws:s3:::REPLACE_BUCKET/*"}
    head = json.load(open(os.path.join(AWS_DIR, "head-launch-policy.json")))
    passrole = [s for s in head["Statement"] if s["Action"] == "iam:PassRole"]
    assert passrole and all(s["Resource"].endswith(":role/cxr-sweep-worker") for s in passrole)
    assert not any(a.startswith("s3:") for s in head["Statement"]
                   for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))


@pytest.mark.parametrize("path", CONFIGS)
def test_node_configs_are_valid_ec2_run_instances_arguments(path):
    """Every node_config is what the launcher passes to EC2 RunInstances: check each field name and
    type against botocore's EC2 API model (offline), so a misspelt field fails here, not at launch."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator
    shape = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in load(path)["available_node_types"].items():
        params = dict(node_type["node_config"], MinCount=1, MaxCount=1)
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    bad = dict(load(path)["available_node_types"]["a10g.spot"]["node_config"], MinCount=1, MaxCount=1)
    bad["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOption": {}}           # misspelt
    assert ParamValidator().validate(bad, shape).has_errors()
