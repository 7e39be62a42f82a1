"""Fractional-GPU packing: the rule, the estimates, and loading gpu_check measurements."""
from __future__ import annotations

import json

import pytest

from orchestrator import packing
from orchestrator.packing import Footprint, gpus_per_trial


def test_rule_packs_by_memory_and_busy_share():
    table = {
        ("small", 160): Footprint(memory_gb=2.0, busy_share=0.2, source="test"),
        ("medium", 160): Footprint(memory_gb=2.0, busy_share=0.4, source="test"),
        ("busy", 160): Footprint(memory_gb=2.0, busy_share=0.5, source="test"),
        ("big", 480): Footprint(memory_gb=30.0, busy_share=0.2, source="test"),
    }
    assert gpus_per_trial("small", 160, 80, table) == pytest.approx(1 / 4)   # 4 x 0.2 = 0.8 <= 0.9
    assert gpus_per_trial("medium", 160, 80, table) == pytest.approx(1 / 2)  # 3 x 0.4 = 1.2 > 0.9
    assert gpus_per_trial("busy", 160, 80, table) == 1.0                     # 2 x 0.5 = 1.0 > 0.9
    # memory: 2 x 30 GB = 60 <= 0.85 x 80 = 68, 3 x 30 = 90 does not fit
    assert gpus_per_trial("big", 480, 80, table) == pytest.approx(1 / 2)
    assert gpus_per_trial("big", 480, 40, table) == 1.0                      # 2 x 30 > 34
    # boundaries are inclusive: 4 x 0.225 = 0.9, 4 x 17 = 68 = 0.85 x 80
    edge = {("edge", 160): Footprint(memory_gb=17.0, busy_share=0.225, source="test")}
    assert gpus_per_trial("edge", 160, 80, edge) == pytest.approx(1 / 4)


def test_unknown_model_gets_a_whole_gpu():
    assert packing.footprint("no-such-net", 320) is None
    assert gpus_per_trial("no-such-net", 320, 80, {}) == 1.0
    assert gpus_per_trial("resnet50", 320, 0, {}) == 1.0


def test_estimates_cover_the_protocol_models_and_scale_with_resolution():
    for model in ("resnet50", "resnet152", "densenet121", "densenet161", "efficientnet-b0",
                  "efficientnet-b5"):
        lo, hi = packing.estimate(model, 160, graphs=False), packing.estimate(model, 480, graphs=False)
        assert lo is not None and hi is not None, model
        assert lo.source == "estimate"
        assert CONTEXT < lo.memory_gb < hi.memory_gb, model           # activations grow with R^2
        assert 0 < lo.busy_share <= hi.busy_share <= 1, model          # bigger steps fill the GPU
        graphed = packing.estimate(model, 160, graphs=True)            # no per-kernel launches
        assert graphed.source == "estimate, CUDA graphs" and graphed.busy_share >= lo.busy_share
        assert packing.estimate(model, 160) == graphed                 # the trainer's default
        assert packing.estimate(model, 480) == hi                      # eager above 320 px
    # the example: an eager small trial is packed on an 80 GB GPU, a large one is not
    eager = packing.estimate_table(cuda_graphs="off")
    assert gpus_per_trial("efficientnet-b0", 160, 80, eager) < 1
    assert gpus_per_trial("resnet152", 480, 80, eager) == 1.0
    assert gpus_per_trial("densenet161", 480, 80, eager) == 1.0
    # with CUDA graphs (the default at <= 320 px) the same small trial keeps a GPU busy alone
    assert gpus_per_trial("efficientnet-b0", 160, 80) == 1.0


CONTEXT = packing.CUDA_CONTEXT_GB


def _report(tmp_path, device_type="cuda", probe_gain=None):
    report = {
        "device_type": device_type, "started": "2026-11-26T02:00:00+00:00",
        "env": {"device_name": "NVIDIA H100 80GB HBM3"},
        "configs": {"results": [
            {"model": "efficientnet-b0", "resolution": 160, "cuda_graphs": True,
             "synthetic": {"images_per_s": 3000.0, "busy_share": 0.8,
                           "peak_memory_reserved_bytes": 3_000_000_000}},
            {"model": "resnet50", "resolution": 480,
             "synthetic": {"images_per_s": 900.0, "busy_share": 0.99,
                           "peak_memory_reserved_bytes": 21_000_000_000}},
            {"model": "densenet121", "resolution": 480, "synthetic": {"error": "OOM"}},
            {"model": "resnet152", "resolution": 320, "synthetic": "skipped: budget"},
        ]},
        "packing_probe": {"model": "efficientnet-b0", "resolution": 160, "cuda_graphs": True,
                          "packing_gain": probe_gain}
        if probe_gain else "skipped: budget",
    }
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_load_measurements_reads_gpu_check_json(tmp_path):
    table = packing.load_measurements(_report(tmp_path))
    assert set(table) == {("efficientnet-b0", 160), ("resnet50", 480)}   # failed/skipped left out
    fp = table[("efficientnet-b0", 160)]
    assert fp.memory_gb == pytest.approx(3.0 + CONTEXT)
    assert fp.busy_share == pytest.approx(0.8)
    assert fp.source.startswith("measured: NVIDIA H100")
    # NVML says 0.8 busy: not packed (2 x 0.8 > 0.9)
    assert gpus_per_trial("efficientnet-b0", 160, 80, table) == 1.0


def test_probe_gain_overrides_nvml_busy_share(tmp_path):
    table = packing.load_measurements(_report(tmp_path, probe_gain=2.5))
    fp = table[("efficientnet-b0", 160)]
    assert fp.busy_share == pytest.approx(0.4) and fp.source.endswith("probe")
    assert gpus_per_trial("efficientnet-b0", 160, 80, table) == pytest.approx(1 / 2)


def test_cpu_measurements_are_ignored_and_table_merges(tmp_path):
    assert packing.load_measurements(_report(tmp_path, device_type="cpu")) == {}
    merged = packing.load_table(_report(tmp_path))
    assert merged[("resnet50", 480)].source.startswith("measured")
    assert merged[("densenet121", 480)].source == "estimate"     # measurement failed: estimate kept


def test_describe_and_cli(tmp_path, capsys):
    text = packing.describe([("efficientnet-b0", 160), ("resnet50", 480), ("mystery", 320)], 80)
    assert "r160 efficientnet-b0" in text and "r480 resnet50: 1 GPU" in text
    assert "no footprint known" in text
    assert packing.main(["--gpu-memory-gb", "80", "--models", "efficientnet-b0", "--resolutions", "160",
                         "--measurements", _report(tmp_path, probe_gain=2.5)]) == 0
    out = capsys.readouterr().out
    assert "r160 efficientnet-b0: 1/2 GPU" in out and "measured" in out
    assert packing.main(["--measurements", str(tmp_path / "missing.json")]) == 2


def test_sweep_helpers():
    from common.cli import UserError
    assert packing.parse_gpus_per_trial("auto") == "auto"
    assert packing.parse_gpus_per_trial(" 0.5 ") == 0.5
    with pytest.raises(UserError, match="gpus-per-trial"):
        packing.parse_gpus_per_trial("half")
    table = {("efficientnet-b0", 160): Footprint(2.0, 0.4, "test")}
    assert packing.trial_resources("efficientnet-b0", 160, 2, 80, table) == {"cpu": 2.0, "gpu": 0.5}
    assert packing.format_fraction(1 / 3) == "1/3" and packing.format_fraction(1.0) == "1"


def test_gpu_memory_from_ray_nodes_and_several_measurement_files(tmp_path):
    nodes = [{"Alive": True, "Resources": {"CPU": 4, "GPU": 0}},
             {"Alive": True, "Resources": {"GPU": 8, "accelerator_type:H100": 1}},
             {"Alive": True, "Resources": {"GPU": 1, "accelerator_type:Mystery-GPU": 1}}]
    assert packing.gpu_memory_from_ray_nodes(nodes) == 80.0           # unknown types skipped
    assert packing.gpu_memory_from_ray_nodes(nodes[:1]) is None        # no GPU node up
    first = tmp_path / "first.json"                                    # NVML busy 0.8
    first.write_text(open(_report(tmp_path)).read())
    first = str(first)
    second = tmp_path / "second.json"                                  # probe: 1 / 4.0
    second.write_text(open(_report(tmp_path, probe_gain=4.0)).read())
    merged = packing.load_table([first, str(second)])                  # later files win
    assert merged[("efficientnet-b0", 160)].busy_share == pytest.approx(0.25)
    assert packing.load_table(first)[("efficientnet-b0", 160)].busy_share == pytest.approx(0.8)


def test_files_measured_with_cudnn_autotuning_are_not_a_trials_figures(tmp_path):
    """Trials run with cuDNN autotuning off; the H200 files (and the H100 cudnn-benchmark file)
    were measured with it on, so neither their rates nor their footprints are taken."""
    import json
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "bench", "results")
    files = [os.path.join(root, f"gpu_check-h200-2026-11-26-{x}.json") for x in "ab"]
    if not all(os.path.exists(f) for f in files):
        pytest.skip("bench/results/gpu_check-h200-*.json not present")
    for path in files:
        assert json.load(open(path))["settings"]["cudnn_benchmark"] is True
        assert packing.load_measurements(path, cuda_graphs="off") == {}
    assert packing.measured_rates(files, cuda_graphs="off") == {}
    # the same rows without autotuning are taken
    report = json.load(open(files[1]))
    report["settings"]["cudnn_benchmark"] = False
    (tmp_path / "h200.json").write_text(json.dumps(report))
    assert packing.load_measurements(str(tmp_path / "h200.json"), cuda_graphs="off")


def test_the_measured_h100_file_uses_the_rows_of_the_trials_graph_mode():
    """bench/results/gpu_check-h100-2026-11-26-full.json measured each 160 px config eager and
    with CUDA graphs; the table takes the mode the trials run in."""
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "results",
                        "gpu_check-h100-2026-11-26-full.json")
    if not os.path.exists(path):
        pytest.skip("bench/results/gpu_check-h100-2026-11-26-full.json not present")
    graphed = packing.load_measurements(path)              # cuda_graphs='auto'
    eager = packing.load_measurements(path, cuda_graphs="off")
    for key in (("resnet50", 160), ("efficientnet-b0", 160), ("densenet121", 160)):
        assert "CUDA graphs" in graphed[key].source and "CUDA graphs" not in eager[key].source
        assert graphed[key].busy_share > eager[key].busy_share, key
    # the 240-image batch experiment is never taken for a trial's footprint
    assert graphed[("resnet50", 160)].memory_gb < 5
    # the packing probe ran EfficientNet-B0 at 160 px with graphs: two copies gained ~5%
    assert graphed[("efficientnet-b0", 160)].source.endswith("probe")
    assert graphed[("efficientnet-b0", 160)].busy_share > 0.9
    table = packing.load_table(path)
    assert gpus_per_trial("efficientnet-b0", 160, 80, table) == 1.0
    assert gpus_per_trial("resnet50", 480, 80, table) == 1.0


def test_measured_rates_replace_the_table_in_the_gpu_hours_estimate(tmp_path):
    from orchestrator import estimate as est
    from orchestrator import throughput
    rates = packing.measured_rates(_report(tmp_path))
    assert rates[("efficientnet-b0", 160)][0] == 3000.0 and ("resnet50", 480) in rates
    assert rates[("efficientnet-b0", 160)][1].endswith("(gpu_check.json)")   # names its file
    trials = [("efficientnet-b0", 160), ("densenet121", 320)]
    e = est.estimate(trials, epochs=2, train_images=3000, valid_images=0, measured=rates)
    assert e.per_group[("efficientnet-b0", 160)]["source"].startswith("measured: NVIDIA H100")
    assert e.per_group[("efficientnet-b0", 160)]["gpu_hours"] == pytest.approx(2 * 3000 / 3000 / 3600)
    assert e.per_group[("densenet121", 320)]["source"] == "table"
    assert e.per_group[("densenet121", 320)]["images_per_s"] == throughput.images_per_s("densenet121", 320)


def test_one_throughput_model_serves_the_estimate_and_the_packing(monkeypatch):
    """The packing's GPU time per step is the protocol batch over the same images/s the GPU-hour
    estimate uses, and the batch is the one images-per-batch figure (40 studies -> 48 images)."""
    from common.schema import images_per_batch
    from orchestrator import throughput
    assert throughput.protocol_images_per_batch() == images_per_batch(40) == 48
    slow = packing.estimate("resnet50", 480, graphs=False)
    monkeypatch.setattr(throughput, "images_per_s", lambda m, r: 1e9)   # a much faster GPU
    fast = packing.estimate("resnet50", 480, graphs=False)
    assert fast.busy_share < slow.busy_share and fast.memory_gb == slow.memory_gb


def test_models_without_a_profile_get_a_flops_estimate():
    from orchestrator import throughput
    assert throughput.source("smallcnn") == "FLOPs estimate"
    flops, where = throughput.forward_flops("smallcnn", 64)
    assert where == "FLOPs estimate" and flops > 0
    assert throughput.images_per_s("smallcnn", 64) > throughput.images_per_s("smallcnn", 128)
    with pytest.raises(ValueError, match="no throughput estimate for 'no-such-net'"):
        throughput.images_per_s("no-such-net", 64)


def test_a_group_measured_compiled_and_eager_is_priced_in_the_trials_compile_mode(tmp_path):
    """With --compile on the compiled figure wins over the eager one of the same group, whatever
    the file order; with compile off (and 'auto', off until measured) the eager one does."""
    def rec(compile, ips):
        return {"model": "densenet161", "resolution": 480, "cuda_graphs": False, "compile": compile,
                "synthetic": {"images_per_s": ips, "busy_share": 1.0,
                              "peak_memory_reserved_bytes": 40_000_000_000}}
    for order in ([rec(True, 400.0), rec(False, 260.0)], [rec(False, 260.0), rec(True, 400.0)]):
        path = tmp_path / "g.json"
        path.write_text(json.dumps({"device_type": "cuda", "configs": {"results": order}}))
        assert packing.load_measurements(str(path), compile="on")[("densenet161", 480)].images_per_s == 400.0
        assert packing.load_measurements(str(path), compile="off")[("densenet161", 480)].images_per_s == 260.0
        assert packing.load_measurements(str(path))[("densenet161", 480)].images_per_s == 260.0
    only_eager = tmp_path / "e.json"
    only_eager.write_text(json.dumps({"device_type": "cuda", "configs": {"results": [rec(False, 260.0)]}}))
    assert packing.load_measurements(str(only_eager), compile="on")[("densenet161", 480)].images_per_s == 260.0
