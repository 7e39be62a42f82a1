"""``python -m preprocessing phantom``: the phantom's command line (the generator is preprocessing.phantom)."""
from __future__ import annotations

from common.cli import UserError
from preprocessing.phantom import TASK_DESIGN, make_phantom
from preprocessing.phantom_layouts import LAYOUTS

HELP = "Write a synthetic dataset (label tables + grayscale images, any layout) whose labels live in the pixels"
EPILOG = """examples:
  python -m preprocessing phantom --out demo/phantom --studies 200
  python -m preprocessing phantom --out /tmp/tiny --studies 12 --min-size 600 --max-size 700 --seed 1
  python -m preprocessing phantom --out /tmp/nih --studies 40 --layout nih --min-size 600 --max-size 700
  python -m preprocessing phantom --visibility          # how much of each finding survives 160..480 px

Layout chexpert writes OUT/train.csv, OUT/valid.csv, OUT/phantom.json and OUT/CheXpert-phantom/
{train,valid}/patientNNNNN/studyN/viewK_{frontal,lateral}.jpg; nih, mimic-cxr-jpg and csv write
those datasets' tables and folders (docs/data.md; phantom.json lists the tables). The image root for
`build --dataset LAYOUT` is OUT. The same arguments give the same bytes (same numpy/Pillow/libjpeg).
"""


def add_arguments(parser) -> None:
    parser.add_argument("--out", help="output folder (the image root); must be empty or an earlier phantom")
    parser.add_argument("--studies", type=int, default=200, help="number of studies over both splits")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes")
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="share of studies in valid")
    parser.add_argument("--min-size", type=int, default=1000, help="smallest image side in pixels")
    parser.add_argument("--max-size", type=int, default=3000, help="largest image side in pixels")
    parser.add_argument("--square", action="store_true", help="square images instead of width 0.80-1.05 x height")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier phantom in --out")
    parser.add_argument("--layout", default="chexpert", choices=LAYOUTS,
                        help="file names and label tables of this dataset layout (build with --dataset LAYOUT)")
    parser.add_argument("--no-film-marks", action="store_true",
                        help="no burned-in text, laterality marker or collimation edges")
    parser.add_argument("--visibility", action="store_true",
                        help="print how much of each finding survives a resize to 160..480 px and exit")


def run(args) -> int:
    if args.visibility:
        from preprocessing.phantom_visibility import visibility_table
        table = visibility_table()
        res = list(next(iter(table.values())))
        print("% of each finding's signal (RMS of the same image with minus without it) left after the "
              "store's square Lanczos resize,\nbefore 8-bit rounding; synthetic phantom, mean of 4 frontal "
              "images of 1400x1540 px")
        print(f"{'task':<18}{'scale':<8}" + "".join(f"{r:>8}" for r in res))
        for task, row in table.items():
            print(f"{task:<18}{TASK_DESIGN[task]['scale']:<8}" + "".join(f"{row[r]:>7.1f}%" for r in res))
        return 0
    if not args.out:
        raise UserError("--out is required (the folder to write the phantom into)")
    if args.workers < 1:
        raise UserError(f"--workers: {args.workers} is not positive")
    info = make_phantom(args.out, studies=args.studies, seed=args.seed, valid_fraction=args.valid_fraction,
                        min_size=args.min_size, max_size=args.max_size, square=args.square,
                        quality=args.quality, workers=args.workers, overwrite=args.overwrite, progress=True,
                        layout=args.layout, film_marks=not args.no_film_marks)
    for w in info["warnings"]:
        print(f"warning: {w}")
    c = info["counts"]
    print(f"SYNTHETIC PHANTOM written to {args.out}: train {c['train']['studies']} studies / "
          f"{c['train']['images']} images, valid {c['valid']['studies']} studies / {c['valid']['images']} images, "
          f"{info['jpeg_bytes'] / 1e6:.1f} MB of images; image root = {args.out}; layout {args.layout}, "
          f"tables: {', '.join(info['tables'])}")
    return 0
