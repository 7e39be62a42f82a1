"""The prepared GPU check: training throughput of the thesis grid's 25 (model, resolution) groups in
the trainer's speed modes, whether those modes train the same model, the real loader, and packing,
as ONE JSON document plus one small JSON per measured group (docs/gpu.md).

Run it on a GPU machine with ``bash bench/gpu_check.sh`` (8-minute limit). Sections, in order:

* ``env``, ``store``: the machine; a small phantom store for the real loader (or ``--store``).
* ``groups``: each thesis group at the protocol batch (40 studies = 48 images, common.schema.images_per_batch) in the mode its
  trials run (CUDA graphs at <= 320 px), ResNet50 at 320 px also fed by the real loader. Each group
  is saved as it finishes and skipped when its file is already in ``--results`` (bench/gpu/groups.py),
  so calls resume. ``compiled_groups``: the 400-480 px groups compiled (trainer/compile.py).
* ``equivalence``: eager against CUDA graphs, compile, and both, from one seed over the same
  batches: losses, weights, BatchNorm statistics (bench/gpu/equivalence.py). Saved and resumed too.
* ``configs``: an ad-hoc list (``--configs MODEL@RES[:graphs][:compile][:bN]``).
* ``loader_rates``, ``packing_probe``, ``mini_sweep``: the loader alone; two processes on one GPU
  against one; two trials of a real sweep sharing the GPU (bench/gpu/sweep.py).

Every section is try/except'd (its error recorded, the rest runs); a global time budget turns what
it cannot reach into ``"skipped: budget"``. ``--tiny --device cpu`` runs the sections at toy sizes
on CPU (tests/test_gpu_check.py), so the check cannot rot between GPU sessions.

    python -m bench.gpu_check --tiny --device cpu --out /tmp/gpu_check.json
    bash bench/gpu_check.sh                      # on the GPU machine
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:     # also runnable as a file: python bench/gpu_check.py
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from bench.gpu import configs as cfgs  # noqa: E402
from bench.gpu import groups as grp  # noqa: E402
from bench.gpu.equivalence import MODES, section_equivalence  # noqa: E402
from bench.gpu.loaders import build_phantom_store, section_loader_rates  # noqa: E402
from bench.gpu.measure import Budget, clean, cpu_count, error_text, log, now, section_env, write_json  # noqa: E402
from bench.gpu.sweep import probe_child, section_mini_sweep, section_packing_probe, setup_device  # noqa: E402
from bench.gpu.trial import BATCH, Trial, repeat, synthetic_batch  # noqa: E402

FULL_SECTIONS = "env,store,groups,equivalence,compiled_groups,loader_rates,packing_probe,mini_sweep"
#: --tiny's stand-in for the thesis groups: the same code paths at toy sizes.
TINY_GROUPS = "resnet18@32,smallcnn@32"

EPILOG = """examples:
  python -m bench.gpu_check --tiny --device cpu --out /tmp/gpu_check.json     # CI-sized, on CPU
  bash bench/gpu_check.sh            # on a GPU machine: 8-minute limit, JSON to $OUT, resumable
  bash bench/gpu_check.sh --sections env,configs \\
      --configs densenet161@480,densenet161@480:compile,resnet50@160:graphs:b240
  python -m bench.gpu_check --device cpu --profile-step resnet50@160 --profile-images 8 --threads 1
  python -m bench.gpu_check --table bench/results/groups-h100-80gb-hbm3    # the groups as Markdown
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes for CI: resnet18/smallcnn at 32 px, few steps")
    p.add_argument("--budget-s", type=float, default=420.0, help="global time budget; later sections are skipped")
    p.add_argument("--out", default=None, help="also write the JSON here (default: $OUT/gpu_check.json if $OUT is set)")
    p.add_argument("--sections", default=FULL_SECTIONS, help="comma-separated sections to run")
    p.add_argument("--groups", default=None, help="override the thesis groups: MODEL@RES[:graphs][:compile],...")
    p.add_argument("--results", default=None,
                   help="folder of per-group JSONs, read to resume and written as groups finish "
                        "(default on CUDA: bench/results/groups-<gpu>; else a temporary folder)")
    p.add_argument("--table", default=None, metavar="DIR",
                   help="only print the Markdown table of the group files in DIR (docs/benchmarks.md)")
    p.add_argument("--configs", default=None,
                   help="the 'configs' section's list: MODEL@RES[:graphs][:compile][:bIMAGES], comma-separated")
    p.add_argument("--store", default=None, help="an existing store for the loader measurements "
                                                 "(default: a phantom store built on the fly)")
    p.add_argument("--seconds", type=float, default=None, help="timed window per measurement")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--min-steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (default min(8, cores) - 1: the training process takes a core)")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default bf16 autocast)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                   help="cuDNN autotuning (default off, as in trainer.train.run_trial: a batch's image "
                        "count varies, and each new shape would be re-tuned)")
    p.add_argument("--store-studies", type=int, default=None, help="studies in the phantom store")
    p.add_argument("--sweep-gpus-per-trial", type=float, default=0.5)
    p.add_argument("--sweep-timeout-s", type=float, default=None)
    p.add_argument("--profile-step", default=None, metavar="MODEL@RES",
                   help="only profile training steps of one model (torch.profiler) and print the top costs")
    p.add_argument("--profile-images", type=int, default=8, help="images per profiled step")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    # internal: one packing-probe process
    p.add_argument("--probe-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(seconds=0.2 if tiny else 2.0, warmup_steps=1 if tiny else 8,
                    min_steps=1 if tiny else 8, store_studies=10 if tiny else 150,
                    sweep_timeout_s=240.0 if tiny else 150.0)
    if tiny:
        BATCH.update(studies=4, images=6)
        # One intra-op thread: on a small shared CI box, torch's spinning worker threads make a
        # tiny step 5-10x slower than one thread does (measured: docs/benchmarks.md, GPU check on CPU).
        torch.set_num_threads(1)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.source_size = 64 if tiny else 512
    args.sweep_resolution = 32 if tiny else 64
    args.sweep_studies = 8 if tiny else 40
    args.probe_model, args.probe_resolution = ("resnet18", 32) if tiny else ("efficientnet-b0", 160)
    args.probe_processes = 2
    args.probe_startup_s = 20.0 if tiny else 40.0
    # a child imports torch and builds its model first: ~55 s each on a loaded 2-core CI box
    args.probe_timeout_s = 300.0 if tiny else args.probe_startup_s + 4 * args.seconds + 60
    args.config_reserve_s = 5.0 if tiny else 20.0     # a config needs this much budget to start
    args.compile_reserve_s = 60.0 if tiny else 150.0  # ... and a compiled one this much
    args.loader_reserve_s = 3.0 if tiny else 15.0
    return args


def default_results(args, env: dict) -> str:
    if args.results:
        return args.results
    if args.tiny or env.get("device", "cpu").startswith("cpu"):
        return tempfile.mkdtemp(prefix="gpu-check-results-")
    name = str(env.get("device_name", "cuda")).lower().replace("nvidia", "").strip()
    slug = "-".join(part for part in name.replace("_", " ").split() if part.isalnum()) or "cuda"
    return os.path.join(REPO, "bench", "results", f"groups-{slug}")


def main(argv=None, report: dict | None = None, out_path: str | None = None) -> dict:
    """Run the check; ``report`` is filled in place (and rewritten to ``out_path`` after every
    section), so a kill or a crash still leaves every finished section on disk."""
    args = parse_args(argv)
    report = {} if report is None else report
    budget = Budget(args.budget_s)
    want = {s.strip() for s in args.sections.split(",") if s.strip()}
    device = setup_device(args)
    workers = args.workers if args.workers is not None else max(1, min(8, cpu_count()) - 1)
    if args.tiny:
        workers = args.workers if args.workers is not None else min(2, cpu_count())
    amp = device.type == "cuda" and not args.no_amp
    channels_last = device.type == "cuda" and not args.no_channels_last
    report.update({
        "tool": "bench/gpu_check.py", "started": now(), "mode": "tiny" if args.tiny else "full",
        "device_type": device.type, "argv": sys.argv[1:] if argv is None else list(argv),
        "torch_threads": torch.get_num_threads(),
        "settings": {"batch_studies": BATCH["studies"], "images_per_batch": BATCH["images"],
                     "amp": "bf16" if amp else "off", "channels_last": channels_last,
                     "cudnn_benchmark": device.type == "cuda" and args.cudnn_benchmark,
                     "stage": "unfrozen (stage 2: body and head train)",
                     "seconds_per_measurement": args.seconds, "warmup_steps": args.warmup_steps,
                     "loader_workers": workers, "budget_s": args.budget_s,
                     "target_share": cfgs.TARGET_SHARE},
    })
    workdir = tempfile.mkdtemp(prefix="gpu-check-")

    def save() -> None:
        if out_path:
            with contextlib.suppress(Exception):
                write_json(clean(report), out_path)

    def run_section(name: str, fn: Callable[[], Any], needs_s: float) -> Any:
        if name not in want:
            report[name] = "not requested"
            return None
        if not budget.allows(needs_s):
            report[name] = "skipped: budget"
            log(f"{name}: skipped (budget: {budget.left:.0f} s left)")
            return None
        log(f"{name}: start ({budget.left:.0f} s of budget left)")
        report[name] = "running (interrupted if this stays)"
        save()
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:
            value = {"error": error_text(exc)}
            log(f"{name}: {value['error']}")
        if isinstance(value, dict):
            value.setdefault("section_seconds", time.perf_counter() - t0)
        report[name] = value
        save()
        return value

    try:
        env = run_section("env", lambda: section_env(device), 0) or section_env(device)
        results = grp.ResultFolder(default_results(args, env),
                                   os.path.join(os.environ["OUT"], "groups") if os.environ.get("OUT") else None)
        header = {k: report[k] for k in ("tool", "started", "mode", "device_type", "settings")}
        header["env"] = env
        if args.groups:
            groups = cfgs.parse_configs(args.groups)
        else:
            groups = cfgs.parse_configs(TINY_GROUPS) if args.tiny else grp.thesis_groups(device)
        adhoc = cfgs.parse_configs(args.configs) if args.configs else []
        loader_res = sorted({c.resolution for c in groups + adhoc if c.loader} | {args.sweep_resolution})
        store = ({"location": args.store} if args.store else run_section("store", lambda: build_phantom_store(
            workdir, args.store_studies, loader_res, args.source_size, workers), 20))

        def measure(cfg):
            return cfgs.measure_config(cfg, device, args, budget, store, workers)

        run_section("groups", lambda: grp.run_groups(
            [g for g in groups if not g.compile], results, header, measure), 10)

        def equivalence() -> dict:
            done = results.load("equivalence.json")
            if done and "error" not in done and done.get("device_type") == device.type:
                return {**done["equivalence"], "reused_from": results.path}
            # --tiny: tests/test_compile.py's case (one batch shape, so inductor compiles once)
            name, res = ("smallcnn", 32) if args.tiny else ("resnet50", 160)
            out = section_equivalence(device, amp, channels_last, name=name, res=res, modes=MODES,
                                      sizes=[BATCH["images"]] * 2 if args.tiny else None)
            results.save("equivalence.json", {**header, "equivalence": out})
            return out

        run_section("equivalence", equivalence, 20 if args.tiny else 120)
        run_section("compiled_groups", lambda: grp.run_groups(
            [g for g in groups if g.compile], results, header, measure), 10)
        run_section("configs", lambda: {"results": cfgs.run_configs(adhoc, device, args, budget, store,
                                                                    workers)}, 10)
        report["group_table"] = grp.group_table(results.path)
        if isinstance(store, dict) and "location" in store:
            run_section("loader_rates", lambda: {"results": section_loader_rates(
                store, loader_res, workers, min(args.seconds, 2.0), device)}, 10)
        else:
            report["loader_rates"] = "not requested" if "loader_rates" not in want else {"error": "no store"}
        # The probe's one-process baseline: its group, in the mode a trial runs it (from the groups).
        from trainer.graphs import want_graphs
        single = grp.stored_rate(results, cfgs.Config(args.probe_model, args.probe_resolution, graphs=want_graphs(
            "auto", device, args.probe_resolution)))
        run_section("packing_probe", lambda: section_packing_probe(args, device, single, budget),
                    args.probe_startup_s + 3 * args.seconds + 10)
        args.sweep_timeout_s = max(30.0, min(args.sweep_timeout_s, budget.left - 15))
        run_section("mini_sweep", lambda: section_mini_sweep(args, store, device, workdir), 45)
        report["summary"] = summarize(report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        report["finished"] = now()
        report["budget_used_s"] = budget.used
        save()
    return clean(report)


def summarize(report: dict) -> dict:
    """What failed or was skipped, one line each (the figures are in ``group_table``)."""
    problems = []
    for section in ("groups", "compiled_groups"):
        v = report.get(section)
        if isinstance(v, dict):
            problems += [f"{section}: {line}" for line in v.get("not_measured", [])]
    for rec in (report.get("configs") or {}).get("results", []) if isinstance(report.get("configs"), dict) else []:
        for part in ("synthetic", "loader"):
            v = rec.get(part)
            if isinstance(v, dict) and "error" in v:
                problems.append(f"{rec['label']} {part}: {v['error']}")
            elif isinstance(v, str) and v.startswith("skipped"):
                problems.append(f"{rec['label']} {part}: {v}")
    eq = report.get("equivalence")
    if isinstance(eq, dict) and "all_within_tolerance" in eq and not eq["all_within_tolerance"]:
        problems.append("equivalence: a mode differs from eager beyond the tolerance")
    for section in ("env", "store", "groups", "compiled_groups", "equivalence", "loader_rates",
                    "mini_sweep", "packing_probe"):
        v = report.get(section)
        if isinstance(v, dict) and "error" in v:
            problems.append(f"{section}: {v['error']}")
        elif isinstance(v, str) and v.startswith("skipped"):
            problems.append(f"{section}: {v}")
    return {"problems": problems}


def profile_step(args) -> int:
    """torch.profiler over training steps of one (model, resolution): the top costs, as a table."""
    from torch.profiler import ProfilerActivity, profile
    device = setup_device(args)
    name, res = args.profile_step.split("@")
    res = int(res)
    cuda = device.type == "cuda"
    BATCH.update(studies=max(1, args.profile_images * 2 // 3), images=args.profile_images)
    trial = Trial(name, res, device, amp=cuda and not args.no_amp,
                  channels_last=cuda and not args.no_channels_last)
    source = repeat(synthetic_batch(res, device))
    trial.run(source, 2)                            # warm-up (allocator, cuDNN autotuning)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        trial.run(source, args.profile_steps)
    wall = time.perf_counter() - t0
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"# {trial.name} at {res} px, {BATCH['images']} images/step, {args.profile_steps} steps, "
          f"{device}, torch threads {torch.get_num_threads()}, step source {trial.step_source}; "
          f"{1000 * wall / args.profile_steps:.0f} ms/step under the profiler")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=40))
    return 0


def default_out_path(out: str | None) -> str | None:
    if out:
        return out
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "gpu_check.json")
    return None


def cli(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_child:
        return probe_child(args)
    if args.profile_step:
        return profile_step(args)
    if args.table:
        print(grp.markdown_table(grp.group_table(args.table)))
        return 0
    import signal

    def _terminate(signum, frame):   # `timeout` sends SIGTERM: leave through the finally blocks
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    out_path = default_out_path(args.out)
    report: dict = {}
    code = 0
    try:
        main(argv, report, out_path)
    except BaseException as exc:   # a bug or a kill: still print what was measured
        report["fatal_error"] = error_text(exc) if not isinstance(exc, SystemExit) else str(exc)
        code = 1
    report = clean(report)
    if out_path:
        write_json(report, out_path)
    print(json.dumps(report, indent=2), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(cli())
