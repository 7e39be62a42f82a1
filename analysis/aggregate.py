"""The results command: one sweep -> tables, statistics, figures and a report (docs/results.md).

:func:`aggregate_sweep` is the one way in (the sweep calls it at its end; ``python -m
analysis.aggregate`` is its command line). It loads the sweep (analysis.records), computes the
tables (analysis.tables) and the paired tests (analysis.comparisons) of the sweep's main
configuration, and writes them with the figures and the report into ``STORAGE/NAME/results``::

    trials.parquet/.csv      one row per finished trial and task: best epoch, AUROC, DeLong 95% CI
    epochs.parquet/.csv      one row per recorded epoch of every trial (losses, AUROC per task)
    summary_*.csv/.md        the thesis's tables; tests_*.csv/.md the paired DeLong tests (Holm)
    sweep_configurations.csv/.md  every configuration met; other_configurations.csv their trials
    figures/*.png, report.md, report.html, problems.csv, incomplete.csv, summary.json
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from analysis import comparisons, families, tables, writer
from analysis.records import SweepData, load_sweep
from common import storage
from common.cli import HelpFormatter, UserError, run_cli
from common.sweep_folder import SweepFolder


@dataclass
class Summary:
    """What :func:`aggregate_sweep` did (the sweep prints ``table`` and logs the rest)."""
    sweep: str
    out_dir: str
    counts: dict[str, int]
    trials: int                 # rows in trials.parquet (trial x task)
    problems: int
    files: list[str]
    table: str
    other_configurations: int = 0   # trials left out because their configuration differs
    figures_skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compute_tables(data: SweepData) -> dict[str, pd.DataFrame]:
    """Every summary and test table of the report, by file stem."""
    res_tests = comparisons.resolution_tests(data)
    return {
        "summary_resolution": tables.summary_by_resolution(data.trials),
        "summary_model": tables.summary_by_model(data.trials).drop(columns=["task_key"]),
        "model_scaling": families.scaling_pairs(data.trials),
        "best_configurations": tables.best_configurations(data.trials),
        "efficientnet": families.compound_scaling(data.trials),
        "tests_resolution": res_tests,
        "tests_resolution_summary": comparisons.resolution_test_summary(res_tests),
        "tests_best_configuration": comparisons.best_configuration_tests(data),
        "sweep_configurations": tables.configurations_table(data),
        "other_configurations": data.other_configurations(),
        "incomplete": data.incomplete(),
        "problems": pd.DataFrame([p.__dict__ for p in data.problems], columns=["where", "what"]),
    }


def aggregate_sweep(sweep_location: str, results_dir: str | None = None, *, bootstrap: int = 0,
                    seed: int = 0, figures: bool = True, report: bool = True,
                    progress: bool = False, gradcam_images: Sequence[str] | None = None) -> Summary:
    """Aggregate one sweep into ``results_dir`` (default ``STORAGE/NAME/results``).

    ``bootstrap`` > 0 adds a stratified percentile bootstrap CI with that many resamples, seeded
    by ``seed``. A location that does not exist is a UserError; bad records are listed, not fatal.
    """
    data = load_sweep(sweep_location, bootstrap=bootstrap, seed=seed, progress=progress)
    out_dir = results_dir or SweepFolder(sweep_location).results_dir
    storage.makedirs(out_dir)
    storage.remove_temp_files(out_dir)   # left by an aggregation killed mid-write; every file is rewritten
    files = writer.write_table(out_dir, "trials", data.trials, parquet=True, markdown=False)
    files += writer.write_table(out_dir, "epochs", data.epochs, parquet=True, markdown=False)
    computed = compute_tables(data)
    for name, df in computed.items():
        files += writer.write_table(out_dir, name, df)
    skipped: list[str] = []
    if report:   # the report draws its own figures (analysis.plots) from the data and tables
        from analysis import report as report_mod
        written, skipped = report_mod.write_report(data, computed, out_dir, bootstrap=bootstrap,
                                                   figures=figures,
                                                   gradcam_images=list(gradcam_images or []))
        files += written
    summary = Summary(sweep=storage.display(sweep_location), out_dir=storage.display(out_dir),
                      counts=data.counts(), trials=len(data.trials), problems=len(data.problems),
                      files=files, table=tables.results_table(data.trials),
                      other_configurations=len(computed["other_configurations"]),
                      figures_skipped=skipped)
    storage.write_json(storage.join(out_dir, "summary.json"), summary.to_dict())
    summary.files.append("summary.json")
    return summary


# --- command line ---------------------------------------------------------------------------------
HELP = "aggregate a sweep into tables, statistics, figures and a report"
EPILOG = """examples:
  python -m analysis.aggregate --sweep sweeps/thesis            # -> sweeps/thesis/results/
  python -m analysis.aggregate --sweep "s3://bucket/sweeps/thesis?endpoint_override=minio:9000&scheme=http" \\
      --results-dir results/thesis --bootstrap 2000
  python -m analysis.aggregate --sweep sweeps/thesis --no-figures --no-report   # tables only

Only trials of the sweep's current configuration (sweep.json's base config and store) are
summarised and compared; trials of other configurations are listed in other_configurations.csv.
Writes trials.parquet/.csv, epochs.parquet/.csv, summary_*.csv/.md, tests_*.csv/.md,
sweep_configurations.csv/.md, figures/*.png, report.md, report.html, problems.csv and summary.json."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", required=True, help="the sweep's storage location (path or s3://...); required")
    parser.add_argument("--results-dir", "--out", dest="results_dir", default=None,
                        help="output folder (default: SWEEP/results)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="also a stratified percentile bootstrap CI with N resamples; 0 = off")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--no-figures", action="store_true",
                        help="a report without figures (and without Grad-CAM)")
    parser.add_argument("--no-report", action="store_true",
                        help="tables only: no report.md, report.html or figures")
    parser.add_argument("--gradcam-images", nargs="+", default=None, metavar="FILE",
                        help="images for the report's Grad-CAM panels (default: the store's first "
                             "two frontal validation images)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no table")


def run(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap: must be >= 0, got {args.bootstrap}")
    if args.gradcam_images:   # a wrong path fails now, not after the tables are written
        from analysis.report_gradcam import read_images
        read_images(args.gradcam_images)
    summary = aggregate_sweep(args.sweep, args.results_dir, bootstrap=args.bootstrap,
                              seed=args.seed, figures=not args.no_figures,
                              report=not args.no_report, progress=not args.quiet,
                              gradcam_images=args.gradcam_images)
    if not args.quiet:
        print(summary.table)
        c = summary.counts
        print(f"\n{c.get('finished', 0)} finished, {c.get('failed', 0)} failed, "
              f"{c.get('running', 0)} running, {c.get('pending', 0)} pending, "
              f"{c.get('missing', 0)} missing; {summary.problems} problem(s) listed in "
              f"{summary.out_dir}/problems.csv")
        if summary.other_configurations:
            print(f"{summary.other_configurations} trial(s) of another configuration left out "
                  f"(listed in {summary.out_dir}/other_configurations.csv)")
        for name in summary.figures_skipped:
            print(f"figure skipped: {name}")
        print(f"wrote {len(summary.files)} files to {summary.out_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.aggregate", description=HELP,
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="analysis.aggregate"))
