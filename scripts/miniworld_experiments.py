"""Regenerate the lab notebook's tables in docs/experiments/ (see dreambooth/miniworld/experiments.py).

    OMP_NUM_THREADS=1 python scripts/miniworld_experiments.py --jobs 2

About 30 CPU-minutes in all on this project's 2-core machines (15 minutes wall with --jobs 2).
Results are cached in --workdir; rerunning only does what is missing. The sweep's tables are rewritten in
docs/experiments/sweeps.md, between its miniworld-experiments markers.

    OMP_NUM_THREADS=1 python scripts/miniworld_experiments.py --bar paper     # the acceptance bar

`--bar NAME ...` trains candidate recipes (experiments.BAR_CANDIDATES) on every held-out subject
with training seeds 0, 1, 2 (about 2.5 CPU-minutes a run) and rewrites the bar tables in
docs/experiments/acceptance-bar.md: each (subject, seed), the mean, the worst case, and which targets each run misses.
"""

import argparse
from pathlib import Path

from dreambooth.miniworld import experiments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="outputs/miniworld-experiments", help="where runs, checkpoints and results go")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses OMP_NUM_THREADS threads)")
    parser.add_argument("--only", nargs="*", help=f"run keys to run: {', '.join(r.key for r in experiments.runs())}")
    parser.add_argument("--bar", nargs="*", help=f"candidate recipes for the acceptance bar: {', '.join(experiments.BAR_CANDIDATES)}")
    parser.add_argument("--seeds", type=int, nargs="*", default=list(experiments.BAR_SEEDS), help="--bar: training seeds")
    parser.add_argument("--n", type=int, default=32, help="images per prompt in each measurement")
    parser.add_argument("--render-only", action="store_true", help="do not train; rebuild the tables from --workdir")
    parser.add_argument("--page", default=None,
                        help=f"file whose generated block is rewritten (default: {experiments.SWEEP_PAGE}, with --bar "
                             f"{experiments.BAR_PAGE}, in this repository; '' = print only)")
    args = parser.parse_args()

    if args.bar:
        seeds = tuple(args.seeds)
        selected = [r for name in args.bar for r in experiments.bar_runs(name, seeds)]
        if not args.render_only:
            experiments.run_all(args.workdir, args.jobs, n=args.n, selected=selected)
        results = experiments.collect(args.workdir)
        # every candidate measured on every (subject, seed) goes in the page, not only the ones just run
        names = [name for name in experiments.BAR_CANDIDATES
                 if name in args.bar or all(r.key in results for r in experiments.bar_runs(name, seeds))]
        tables, markers = experiments.render_bar(results, names, seeds), (experiments.BAR_BEGIN, experiments.BAR_END)
        default_page = experiments.BAR_PAGE
    else:
        results = experiments.collect(args.workdir) if args.render_only else experiments.run_all(args.workdir, args.jobs, args.only, args.n)
        tables, markers = experiments.render(results, args.n), (experiments.BEGIN, experiments.END)
        default_page = experiments.SWEEP_PAGE
    print(tables)
    page = Path(__file__).resolve().parents[1] / default_page if args.page is None else args.page
    if page:
        experiments.update_tables(page, tables, markers)
        print(f"updated {page}")


if __name__ == "__main__":  # --jobs starts worker processes that import this file
    main()
