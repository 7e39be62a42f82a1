"""Property-based tests (hypothesis): whatever a user feeds the label parser, the policy parser and
the sweep's flag and grid parsers, they either accept it or raise our one-line UserError (or
argparse's usage error, which the CLIs print as one line too) - never anything else."""
from __future__ import annotations

import argparse
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.cli import UserError, parse_int_list
from common.schema import TASKS

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *TASKS]
label_values = st.sampled_from(["1.0", "0.0", "-1.0", "", "1", "0", "-1", " 1.0 ", "x", "nan",
                                "2.0", "1e0", '"1.0"', "\x00", "é", "1.0,0.0"])
paths = st.one_of(
    st.builds(lambda p, s, v, split: f"CheXpert-v1.0/{split}/patient{p:05d}/study{s}/view{v}_frontal.jpg",
              st.integers(0, 99999), st.integers(0, 9), st.integers(1, 3),
              st.sampled_from(["train", "valid", "test"])),
    st.sampled_from(["", "/abs/patient00001/study1/v.jpg", "../patient00001/study1/v.jpg",
                     "C:/x/patient1/study1/v.jpg", "s3://b/patient1/study1/v.jpg", "just-a-file.jpg",
                     "patient1/study1/", "a\nb"]),
    st.text(max_size=40))
rows = st.lists(st.tuples(paths, st.sampled_from(["Female", "Male", "", "Unknown"]),
                          st.sampled_from(["60", "", "-3", "abc"]),
                          st.sampled_from(["Frontal", "Lateral", "", "Side"]),
                          st.sampled_from(["AP", "PA", "LL", "", "??"]),
                          st.lists(label_values, min_size=len(TASKS), max_size=len(TASKS))),
                max_size=8)


def csv_text(header, body) -> str:
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for path, sex, age, view, apa, labels in body:
        w.writerow([path, sex, age, view, apa, *labels])
    return buf.getvalue()


headers = st.one_of(
    st.just(HEADER),
    st.permutations(HEADER),
    st.lists(st.sampled_from(HEADER + ["Extra", "", "Path"]), max_size=len(HEADER) + 2),
)


@SETTINGS
@given(header=headers, body=rows, garbage=st.one_of(st.none(), st.binary(max_size=64)))
def test_label_parser_accepts_or_raises_one_line_errors(tmp_path, header, body, garbage):
    from preprocessing.labels import read_labels
    path = tmp_path / "train.csv"
    if garbage is not None and not body:
        path.write_bytes(garbage)
    else:
        path.write_text(csv_text(header, body), encoding="utf-8")
    try:
        labels = read_labels([str(path)])
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    # accepted: every data row is either kept or rejected with a reason, never silently dropped
    assert len(labels.frame) + len(labels.rejects) == labels.rows_in == len(body)
    assert all(r.reason and "0x" not in r.reason for r in labels.rejects)


@SETTINGS
@given(text=st.one_of(st.text(max_size=60),
                      st.lists(st.tuples(st.sampled_from([*TASKS, "edema", "Nope", ""]),
                                         st.sampled_from(["ones", "zeros", "ignore", "ONES", "x", ""])),
                               max_size=6).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv))))
def test_policy_parser(text):
    from preprocessing.labels import parse_policy
    try:
        policy = parse_policy(text)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert set(policy) >= set(TASKS) and set(policy.values()) <= {"ones", "zeros", "ignore"}


@SETTINGS
@given(text=st.one_of(st.text(max_size=30),
                      st.lists(st.one_of(st.integers(-5, 1000).map(str), st.sampled_from(
                          ["", " ", "1.5", "1e3", "0x10", "٣", "²"])), max_size=6).map(",".join)))
def test_int_list_parser(text):
    try:
        values = parse_int_list(text, "--resolutions")
    except UserError as exc:
        assert str(exc).startswith("--resolutions: ") and "\n" not in str(exc)
        return
    assert values and all(isinstance(v, int) and v > 0 for v in values)


@SETTINGS
@given(text=st.one_of(st.text(max_size=30), st.lists(st.one_of(
    st.integers(-3, 50).map(str), st.tuples(st.integers(-3, 20), st.integers(-3, 20)).map(
        lambda ab: f"{ab[0]}-{ab[1]}"), st.sampled_from(["", "a-b", "-", "1--2", "3-"])),
    max_size=5).map(",".join)))
def test_seed_parser(text):
    from orchestrator.sweep_config import parse_seeds
    try:
        seeds = parse_seeds(text)
    except (argparse.ArgumentTypeError, UserError) as exc:
        assert "\n" not in str(exc)
        return
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds)


FLAG_VALUES = {
    "--resolutions": ["160,240", "0", "-1", "abc", "", "32,32", "1e9", "160,,240"],
    "--models": ["resnet18", "vgg16", "", "timm:", "timm:nonexistent_net", "efficientnet,resnet50"],
    "--seeds": ["0-4", "4-0", "a", "", "0,0,1", "-1"],
    "--task-mode": ["multi", "single", "both"],
    "--tasks": ["Edema", "edema", "Nope", ""],
    "--cpus-per-trial": ["1", "0", "-2", "99", "nan", "inf", "x"],
    "--gpus-per-trial": ["auto", "0", "0.5", "1.5", "2", "-1", "x"],
    "--gpu-memory-gb": ["24", "0", "-1", "x"],
    "--max-failures": ["0", "-1", "3", "1.5"],
    "--max-concurrent": ["0", "-1", "2", "x"],
    "--num-cpus": ["0", "-1", "2", "x"],
    "--num-gpus": ["0", "-1", "1"],
    "--progress-interval": ["-5", "0", "10", "nan", "x"],
    "--progress": ["auto", "table", "lines", "fancy"],
    "--log": ["none", "tensorboard", "mlflow,wandb", "nope"],
    "--name": ["ok", "../x", "", "a/b", ".hidden"],
    "--epochs-frozen": ["1", "-1", "0", "x"],
    "--epochs-unfrozen": ["1", "-1", "0", "x"],
    "--lr-head": ["0.001", "-1", "0", "nan", "x"],
    "--batch-studies": ["8", "0", "-1", "x"],
}
argvs = st.lists(st.sampled_from(sorted(FLAG_VALUES)).flatmap(
    lambda f: st.sampled_from(FLAG_VALUES[f]).map(lambda v: [f, v])), max_size=6).map(
    lambda pairs: [x for p in pairs for x in p])


@pytest.fixture
def no_settings_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # no cxr-sweep.toml above this folder
    for key in list(os.environ):
        if key.startswith("CXR_SWEEP_"):
            monkeypatch.delenv(key)


@SETTINGS
@given(argv=argvs)
def test_sweep_flags_and_grid_parse_or_refuse_in_one_line(no_settings_file, argv):
    from orchestrator.grid import build_grid
    from orchestrator.sweep import configs_from_argv
    try:
        sweep, train = configs_from_argv(["--dry-run", *argv], environ={})
        train.validate()
        build_grid(sweep.resolutions, sweep.models, sweep.seeds, sweep.task_mode,
                   list(sweep.tasks or train.tasks))
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert sweep.cpus_per_trial > 0 and sweep.progress_interval > 0
    assert sweep.max_failures >= 0 and sweep.max_concurrent >= 0
