"""``python -m orchestrator.demo``: the whole product on a laptop in minutes, on synthetic data.

phantom (CheXpert-layout JPEGs) -> store (five resolutions) -> sweep on an embedded local Ray
instance -> aggregate -> results table. Every step is an ordinary entry point of the project; this
module only chains them with a budget small enough for a 2-core machine. Re-running it resumes: the
phantom and store are reused when present and finished trials are not run again.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import storage
from common.cli import HelpFormatter, UserError, parse_int_list, run_cli
from common.schema import MANIFEST_NAME

EPILOG = """A 300-study phantom (1,000-1,400 px JPEGs in CheXpert layout), a store at 160/240/320/400/480
px, and a sweep of one smallcnn trial per resolution on an embedded local Ray (random init, 4
epochs, batch 8 studies, no augmentation), then the aggregator and its table; everything lands in
demo/, the report in demo/results/report.html. Re-running it resumes.

examples:
  python -m orchestrator.demo                      # the README's demo (285 s on 2 cores, measured)
  python -m orchestrator.demo --out /tmp/demo --resolutions 160,320 --studies 120

The full thesis grid on a GPU cluster is `python -m orchestrator.sweep` (docs/sweep.md, docs/cluster.md).
"""

#: The demo's budget, sized for a 2-core laptop in well under 10 minutes (measured: README). The
#: same settings as the science check (bench/science_check.sh) on a smaller phantom: smallcnn from
#: random weights (no ImageNet weights can be downloaded at run time, and a ResNet-18 trains at
#: ~0.5 images/s at 480 px on such a CPU), no frozen-body epoch, batch 8 studies and larger LRs
#: than the thesis protocol (nothing is pretrained), no augmentation.
DEMO = dict(studies=300, seed=0, min_size=1000, max_size=1400, models="smallcnn", seeds="0",
            epochs=4, train={"weights": "none", "epochs_frozen": 0, "batch_studies": 8,
                             "lr_body": 1e-3, "lr_head": 1e-2, "augment": False, "workers": 0})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.demo",
                                description="The whole pipeline on synthetic data in minutes: "
                                            "phantom -> store -> sweep -> report.",
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo", help="folder for the phantom, the store and the sweep")
    p.add_argument("--resolutions", default="160,240,320,400,480", help="store and sweep resolutions")
    p.add_argument("--studies", type=int, default=DEMO["studies"], help="phantom studies (train + valid)")
    p.add_argument("--models", default=DEMO["models"], help="comma-separated model names")
    p.add_argument("--seeds", default=DEMO["seeds"], help="comma-separated seeds")
    p.add_argument("--epochs", type=int, default=DEMO["epochs"], help="unfrozen epochs per trial")
    p.add_argument("--cpus-per-trial", type=float, default=float(os.cpu_count() or 1),
                   help="CPUs per trial (all of them by default: trials then run one at a time)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from preprocessing.build import build_store
    from preprocessing.phantom import make_phantom
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import SweepConfig
    from trainer.config import TrainConfig

    resolutions = parse_int_list(args.resolutions, "--resolutions")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds: {args.seeds!r} is not a comma-separated list of integers") from None
    out = os.path.abspath(args.out)
    phantom_dir, store_dir = os.path.join(out, "phantom"), os.path.join(out, "store")
    started = time.time()

    print(f"==> [1/3] synthetic phantom: {args.studies} studies in {phantom_dir}", flush=True)
    if not os.path.exists(os.path.join(phantom_dir, "phantom.json")):
        make_phantom(phantom_dir, studies=args.studies, seed=DEMO["seed"], min_size=DEMO["min_size"],
                     max_size=DEMO["max_size"], workers=os.cpu_count() or 1, overwrite=True)
    else:
        print("    (reusing the phantom already there)")

    print(f"==> [2/3] store at {', '.join(map(str, resolutions))} px in {store_dir}", flush=True)
    manifest = storage.read_json(os.path.join(store_dir, MANIFEST_NAME)) \
        if os.path.exists(os.path.join(store_dir, MANIFEST_NAME)) else None
    if manifest is None or not set(resolutions) <= set(manifest["resolutions"]):
        build_store(phantom_dir, [os.path.join(phantom_dir, "train.csv"),
                                  os.path.join(phantom_dir, "valid.csv")],
                    store_dir, resolutions=resolutions, use_ray=False)
    else:
        print("    (reusing the store already there)")

    print("==> [3/3] sweep on an embedded local Ray instance", flush=True)
    sweep = SweepConfig(resolutions=tuple(resolutions), store=store_dir,
                        storage=os.path.join(out, "sweeps"), name="demo",
                        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                        seeds=tuple(seeds), cpus_per_trial=args.cpus_per_trial, gpus_per_trial="0",
                        results_dir=os.path.join(out, "results"), progress_interval=15.0)
    train = TrainConfig.from_dict({**DEMO["train"], "epochs_unfrozen": args.epochs})
    typed = list(argv if argv is not None else sys.argv[1:])
    result = run_sweep(sweep, train, command=" ".join(["python -m orchestrator.demo"] + typed),
                       argv=typed)
    print(f"==> demo finished in {time.time() - started:.0f} s; report: "
          f"{os.path.join(out, 'results', 'report.html')}")
    print("    SYNTHETIC PHANTOM DATA, tiny budget: these AUROCs show the pipeline working, not an "
          "answer about chest radiographs (README, 'The demo').")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="orchestrator.demo"))
