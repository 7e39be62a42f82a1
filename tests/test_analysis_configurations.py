"""Results never mix configurations: two runs of one sweep name with another hyperparameter are
kept apart in every table and test, and the paired test refuses to compare across them."""
from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from analysis import aggregate as agg
from analysis import comparisons
from analysis.configuration import configuration_key
from analysis.records import load_sweep
from common.schema import TASKS
from common.sweep_folder import SweepFolder
from trainer.config import TrainConfig

try:  # tests/ as a plain folder (pytest's default rootdir import) or as a package
    from test_aggregate import fabricate_sweep
except ImportError:
    from tests.test_aggregate import fabricate_sweep


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run 1: 64 and 96 px at the default lr_head; run 2, same sweep name: 64 px at lr_head 0.02
    (the situation where the old aggregator tested 64 px at 0.02 against 96 px at the default)."""
    root = tmp_path_factory.mktemp("two_runs")
    first = fabricate_sweep(root, resolutions=(64, 96), models=("resnet18",), seeds=(0,), epochs=1)
    second = fabricate_sweep(root, resolutions=(64,), models=("resnet18",), seeds=(0,), epochs=1,
                             config={"lr_head": 0.02})
    assert first.location == second.location
    return first, second


def test_only_the_current_configuration_is_tabled(two_runs):
    first, second = two_runs
    data = load_sweep(second.location)
    assert set(data.trials["trial_id"]) == {second.trials[0].trial_id}
    assert set(data.other_trials["trial_id"]) == {t.trial_id for t in first.trials}
    assert set(data.trials["resolution"]) == {64}
    assert data.counts() == {"finished": 1, "failed": 0, "running": 0, "pending": 0, "missing": 0}
    # The 96 px point exists only at the other lr_head: there is nothing to compare it with.
    assert comparisons.resolution_tests(data).empty
    assert comparisons.best_configuration_tests(data).empty
    other = data.other_configurations()
    assert set(other["trial_id"]) == {t.trial_id for t in first.trials}
    default_lr = TrainConfig().lr_head
    assert set(other["differs_from_main"]) == {f"lr_head={default_lr:g} (main 0.02)"}
    listed = [p for p in data.problems if "another configuration" in p.what]
    assert len(listed) == 2 and all("lr_head" in p.what for p in listed)


def test_the_paired_test_refuses_to_compare_across_configurations(two_runs):
    _, second = two_runs
    data = load_sweep(second.location)
    a = data.trials[data.trials["task"] == TASKS[0]].iloc[0]
    b = data.other_trials[(data.other_trials["task"] == TASKS[0])
                          & (data.other_trials["resolution"] == 96)].iloc[0]
    with pytest.raises(comparisons.MixedConfigurations, match="not one configuration"):
        comparisons.paired_delong(data, a["task_key"], a, b)
    # The same pair within one configuration is tested (the refusal is about configurations).
    same = comparisons.paired_delong(data, a["task_key"], a, a)
    assert same["p_value"] == 1.0 and same["studies"] > 0


def test_the_first_run_alone_is_compared_within_itself(two_runs, tmp_path):
    """Seen from run 1's configuration (its sweep.json back in place), its two resolutions are one
    configuration and are tested; run 2's trial is the one listed apart."""
    first, second = two_runs
    location = str(tmp_path / "copy")
    shutil.copytree(second.location, location)
    sweep = load_sweep(location).sweep
    base = {k: v for k, v in sweep.base_config.items() if k != "lr_head"}
    base["lr_head"] = TrainConfig().lr_head
    sweep.base_config = base
    sweep.trial_ids = [t.trial_id for t in first.trials]
    sweep.trials = {t.trial_id: t.params.as_dict() for t in first.trials}
    SweepFolder(location).write_sweep_file(sweep)
    data = load_sweep(location)
    assert set(data.trials["trial_id"]) == {t.trial_id for t in first.trials}
    assert set(data.other_trials["trial_id"]) == {second.trials[0].trial_id}
    tests = comparisons.resolution_tests(data)
    assert len(tests) == len(TASKS) and set(tests["resolution_a"]) == {96}


def test_the_aggregated_files_list_the_other_configuration(two_runs, tmp_path):
    _, second = two_runs
    summary = agg.aggregate_sweep(second.location, str(tmp_path / "out"), report=False)
    assert summary.other_configurations == 2
    confs = pd.read_csv(tmp_path / "out" / "sweep_configurations.csv")
    assert confs["main"].tolist() == [True, False]
    assert confs["finished"].tolist() == [1, 2]
    assert "lr_head=" in confs["differs_from_main"].iloc[1]
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert set(trials["resolution"]) == {64} and trials["configuration"].nunique() == 1
    summary_res = pd.read_csv(tmp_path / "out" / "summary_resolution.csv")
    assert set(summary_res["runs"]) == {1}
    assert os.path.exists(tmp_path / "out" / "other_configurations.csv")


def test_configuration_key_ignores_grid_axes_and_fields_that_do_not_change_results():
    cfg = TrainConfig(store="/a").to_dict()
    key = configuration_key(cfg, "m" * 64)
    for change in ({"resolution": 96}, {"seed": 3}, {"model": "resnet18"}, {"store": "/b"},
                   {"workers": 7}):
        assert configuration_key({**cfg, **change}, "m" * 64) == key, change
    assert configuration_key({**cfg, "lr_head": cfg["lr_head"] * 2}, "m" * 64) != key
    assert configuration_key(cfg, "n" * 64) != key            # another store content
    assert configuration_key({**cfg, "from_the_future": 1}, "m" * 64) != key
    # JSON-equal values are one configuration (tuple vs list, 1 vs 1.0).
    as_float = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                for k, v in cfg.items()}
    assert configuration_key(as_float, "m" * 64) == key


def test_without_sweep_json_the_configuration_of_most_trials_is_the_main_one(two_runs, tmp_path):
    first, second = two_runs
    location = str(tmp_path / "copy")
    shutil.copytree(second.location, location)
    os.remove(SweepFolder(location).sweep_file)
    data = load_sweep(location)
    assert set(data.trials["trial_id"]) == {t.trial_id for t in first.trials}   # 2 trials vs 1
    assert set(data.other_trials["trial_id"]) == {second.trials[0].trial_id}
    assert any("configuration of most trials" in p.what for p in data.problems)
    assert any(p.what.endswith("is missing") and p.where == SweepFolder(location).sweep_file
               for p in data.problems)


def test_an_earlier_trial_that_never_started_is_not_listed(tmp_path):
    first = fabricate_sweep(tmp_path, resolutions=(64,), models=("resnet18",), seeds=(0, 1),
                            epochs=1, finished=lambda t: t.params.seed == 0)
    second = fabricate_sweep(tmp_path, resolutions=(64,), models=("resnet18",), seeds=(0,),
                             epochs=1, config={"lr_head": 0.02})
    data = load_sweep(second.location)
    never_started = first.trials[1].trial_id
    assert never_started not in {r.trial_id for r in data.records}
    assert not any(never_started in p.where or never_started in p.what for p in data.problems)
    assert set(data.other_trials["trial_id"]) == {first.trials[0].trial_id}
    assert list(data.trials["trial_id"].unique()) == [second.trials[0].trial_id]
