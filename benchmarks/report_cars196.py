"""Benchmark ``carclf report`` on a cars196 run: time taken, the confusable groups and likely label errors it names.

    flock /tmp/carclf-bench.lock python benchmarks/report_cars196.py [RUN] [--out benchmarks/out/report-cars196]

RUN defaults to the newest ``benchmarks/out/cpu-lite0-bench-*`` with a completed fold. The report is written twice:
first from scratch (a run trained before ``oof.npz`` kept features has them computed from its fold models and
cached), then again with ``--overwrite`` (features from the cache). Prints the timings of each part, the scores at
class and group level, the top confusable groups and likely label errors, and the machine's load (it is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def newest_run() -> Path:
    runs = sorted((ROOT / "benchmarks" / "out").glob("cpu-lite0-bench-*/fold*/oof.npz"))
    if not runs:
        sys.exit("no benchmarks/out/cpu-lite0-bench-*/fold*/oof.npz: train a run first (benchmarks/cars196.py)")
    return runs[-1].parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "report-cars196")
    ap.add_argument("--keep-cache", action="store_true", help="do not time the feature computation again")
    args = ap.parse_args()
    run = args.run or newest_run()
    from carclf.analyze.report import write_report
    from carclf.artifacts.report import REPORT_FEATURE_CACHE as FEATURE_CACHE
    from carclf.artifacts.report import REPORT_MARKER

    cache = args.out / FEATURE_CACHE
    if cache.is_file() and (args.out / REPORT_MARKER).is_file() and not args.keep_cache:
        cache.unlink()  # the report's own cache: time the computation from the fold models too
    results = {"run": str(run), "load_before": os.getloadavg()}
    for label in ("first", "again"):
        t = time.perf_counter()
        write_report(run, args.out, overwrite=True)
        results[f"{label}_s"] = round(time.perf_counter() - t, 1)
        results[f"{label}_timings"] = json.loads((args.out / "report.json").read_text(encoding="utf-8"))["timings_s"]
    results["load_after"] = os.getloadavg()
    summary = json.loads((args.out / "report.json").read_text(encoding="utf-8"))
    html_kb = (args.out / "report.html").stat().st_size / 1024
    thumbs = list((args.out / "thumbs").glob("*.jpg"))
    print(f"run: {run}  ({summary['n']} out-of-fold photos, {summary['classes']} classes)")
    for label in ("first", "again"):
        tim = ", ".join(f"{k} {v:.1f}" for k, v in results[f"{label}_timings"].items())
        print(f"{label}: {results[f'{label}_s']} s  ({tim})")
    print(f"page: {html_kb:.0f} KB HTML, {len(thumbs)} thumbnails "
          f"({sum(p.stat().st_size for p in thumbs) / 1024:.0f} KB); features: {summary['features']}")
    print(f"load average before / after: {results['load_before']} / {results['load_after']}")
    for h in summary["headline"]:
        if h["fold"] == "all" or len({r["fold"] for r in summary["headline"]}) == 1:
            print(f"fold {h['fold']} {h['probs']}: log loss {h['log_loss_submitted']:.4f}  acc {h['accuracy']:.4f}  "
                  f"top-5 {h['top5']:.4f}  ECE {h['ece']:.4f}  conf {h['confidence']:.3f}  gap {h['gap']:.3f}")
    for level, s in summary["group_scores"].items():
        print(f"{level}: accuracy {s['accuracy']:.4f}  log loss {s['log_loss']:.4f}")
    print(f"confusion groups: {len(summary['confusion_groups'])}; closest 12:")
    for g in summary["confusion_groups"][:12]:
        print(f"  {g['distance']:.3f}  {' | '.join(g['classes'])}")
    print(f"likely label errors ({summary['label_issue_method']}): {summary['label_issues']}; first 12:")
    for r in summary["top_label_issues"][:12]:
        print(f"  {r['path']}  given {r['given_label']} p={r['p_given']:.3f} -> {r['suggested_label']} "
              f"p={r['p_suggested']:.3f}")
    print(f"report: {args.out / 'report.html'}")


if __name__ == "__main__":
    main()
