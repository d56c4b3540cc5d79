"""How well does the cheap drift probe (dreambooth/monitor.py) predict the drift the classifier measures?

    OMP_NUM_THREADS=1 python scripts/drift_signal_correlation.py /work/runs/bar --json drift_correlation.json

For every finished miniature-world run under RUNS (`RUNS/<run>/model` a full pipeline folder,
`RUNS/<run>/results.json` holding the classifier's metrics under "800|ddim|25", `RUNS/base/results.json`
the base's), it computes offline what `monitor.every_n_steps` logs during training:

    drift       = class-probe loss of the final model - class-probe loss of the base
    subject_fit = subject-probe loss of the final model / subject-probe loss of the base

with the run's own class images ("a photo of a toy") and instance photos, the probe built once from
the base with seed 0, at the training default probe_size (8) and at a larger one (32) to see how
much of the scatter is the probe's own noise. It then reports Pearson and Spearman correlations
of drift with the measured class drift (share of class-prompt images the classifier calls the
subject) and with the drop in prompt following (base minus model, all three attributes). Nothing
under RUNS is written.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

KEY = "800|ddim|25"


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata), for Spearman's rho."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def correlations(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return {"pearson": None, "spearman": None, "n": len(x)}
    return {"pearson": float(np.corrcoef(x, y)[0, 1]), "spearman": float(np.corrcoef(ranks(x), ranks(y))[0, 1]),
            "n": len(x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder of miniature-world runs (e.g. /work/runs/bar)")
    parser.add_argument("--base", type=Path, default=None, help="base pipeline folder (default: the bundled miniature base)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="probe sizes to measure")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

    import torch
    import yaml

    from dreambooth.data.dataset import Example
    from dreambooth.data.images import list_images, load_images
    from dreambooth.miniworld.evaluate import DEFAULT_BASE
    from dreambooth.models.load import load_components
    from dreambooth.monitor import build_probe, probe_loss

    torch.set_num_threads(args.threads)
    base_dir = args.base or DEFAULT_BASE
    base_following = json.loads((args.runs / "base" / "results.json").read_text())["0|ddim|25"]["prompt_following"]["all"]
    runs = [p.parent for p in sorted(args.runs.glob("*/results.json"))
            if KEY in json.loads(p.read_text()) and (p.parent / "model" / "model_index.json").is_file()]
    base = load_components(base_dir)
    rows, probes = [], {}
    for run in runs:
        measured = json.loads((run / "results.json").read_text())[KEY]
        cfg = yaml.safe_load((run / "model" / "config.yaml").read_text())
        concept, resolution = cfg["concept"], cfg["data"]["resolution"]
        size = (resolution, resolution)
        class_files = list_images(concept["class_dir"], "class")[: cfg["prior"]["num_class_images"]]
        if concept["class_dir"] not in probes:  # the class probe is shared by every run with the same class images
            klass = [Example(p, concept["class_prompt"], im) for p, im in zip(class_files, load_images(class_files, 1))]
            probes[concept["class_dir"]] = {n: build_probe(base, klass, [size] * len(klass), "class", n, 0) for n in args.sizes}
            probes[concept["class_dir"]]["base"] = {n: probe_loss(base, p) for n, p in probes[concept["class_dir"]].items()}
        photos = list_images(concept["instance_dir"], "instance")
        subject = [Example(p, concept["instance_prompt"], im) for p, im in zip(photos, load_images(photos, 1))]
        model = load_components(run / "model")
        row = {"run": run.name, "class_drift": measured["class_drift"],
               "following_drop": base_following - measured["prompt_following"]["all"],
               "subject_fidelity": measured["subject_fidelity"], "prompt_fidelity": measured["prompt_fidelity"]}
        for n in args.sizes:
            class_probe = probes[concept["class_dir"]][n]
            row[f"drift@{n}"] = probe_loss(model, class_probe) - probes[concept["class_dir"]]["base"][n]
            subject_probe = build_probe(base, subject, [size] * len(subject), "subject", n, 1)
            row[f"subject_fit@{n}"] = probe_loss(model, subject_probe) / probe_loss(base, subject_probe)
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    summary = {}
    for n in args.sizes:
        drift = [r[f"drift@{n}"] for r in rows]
        summary[n] = {"class_drift": correlations(drift, [r["class_drift"] for r in rows]),
                      "following_drop": correlations(drift, [r["following_drop"] for r in rows])}
    base_losses = {n: loss for probes_ in probes.values() for n, loss in probes_["base"].items()}
    print(f"\n{len(rows)} models (runs under {args.runs} with {KEY} measured); base prompt following {base_following:.3f}; "
          "base class-probe loss " + ", ".join(f"{v:.4f} (probe_size {n})" for n, v in base_losses.items()))
    for n, s in summary.items():
        for target, c in s.items():
            fmt = (lambda v: "n/a" if v is None else f"{v:+.2f}")
            print(f"probe_size {n:>3}: drift vs {target:<15} Pearson {fmt(c['pearson'])}  Spearman {fmt(c['spearman'])}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "base_following": base_following,
                                          "base_class_probe_loss": base_losses}, indent=1) + "\n")


if __name__ == "__main__":
    main()
