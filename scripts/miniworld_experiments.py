"""Regenerate the README's "Experiments in miniature" tables (see dreambooth/miniworld/experiments.py).

    OMP_NUM_THREADS=1 python scripts/miniworld_experiments.py --jobs 2

About 30 CPU-minutes in all on this project's 2-core machines (15 minutes wall with --jobs 2).
Results are cached in --workdir; rerunning only does what is missing.
"""

import argparse
from pathlib import Path

from dreambooth.miniworld import experiments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="outputs/miniworld-experiments", help="where runs, checkpoints and results go")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses OMP_NUM_THREADS threads)")
    parser.add_argument("--only", nargs="*", help=f"run keys to run: {', '.join(r.key for r in experiments.runs())}")
    parser.add_argument("--n", type=int, default=32, help="images per prompt in each measurement")
    parser.add_argument("--render-only", action="store_true", help="do not train; rebuild the tables from --workdir")
    parser.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "README.md"),
                        help="file whose experiments block is rewritten ('' = print only)")
    args = parser.parse_args()

    results = experiments.collect(args.workdir) if args.render_only else experiments.run_all(args.workdir, args.jobs, args.only, args.n)
    tables = experiments.render(results, args.n)
    print(tables)
    if args.readme:
        experiments.update_readme(args.readme, tables)
        print(f"updated {args.readme}")


if __name__ == "__main__":  # --jobs starts worker processes that import this file
    main()
