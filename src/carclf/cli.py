"""``carclf``: thin command line; each mode maps straight onto a library call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from carclf.errors import CarclfError

EVAL_COLUMNS = [
    "fold", "n", "temperature", "log_loss_raw", "log_loss", "log_loss_model", "accuracy", "top5", "ece_raw", "ece",
]


def _train(args: argparse.Namespace) -> None:
    from carclf.config import load_config
    from carclf.runtime import dist_info
    from carclf.train.loop import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if dist_info().is_main:
        print(f"run directory: {run_dir}")


def _prepare(args: argparse.Namespace) -> None:
    from carclf.config import load_config
    from carclf.data.rundata import prepare_dir, run_prepare

    cfg = load_config(args.config, [f"data.root={args.data}", f"out_dir={args.out_dir}", *args.overrides])
    prepared = run_prepare(cfg)
    s = prepared.summary
    print(f"prepare directory: {prepare_dir(cfg)}  (near-duplicate threshold {s['threshold']} bits)")
    print(json.dumps(s["counts"], ensure_ascii=False))
    if args.report:
        from carclf.analyze.prepare_report import write_report

        print(f"report: {write_report(prepared, cfg.data.root, prepare_dir(cfg) / 'report.html')}")


def _calibrate(args: argparse.Namespace) -> None:
    from carclf.analyze.evaluate import format_table
    from carclf.calibrate.temperature import calibrate_run

    rows = calibrate_run(args.run)
    print(format_table(rows, ["fold", "n", "temperature", "nll_before", "nll_after"]))


def _predict(args: argparse.Namespace) -> None:
    from carclf.infer.predict import predict_run

    path, _ = predict_run(args.run, args.data, args.output, overwrite=args.overwrite, device=args.device)
    print(f"wrote {path}")


def _evaluate(args: argparse.Namespace) -> None:
    from carclf.analyze.evaluate import evaluate_run, format_table

    rows = evaluate_run(args.run)
    print(format_table(rows, EVAL_COLUMNS))
    print("log_loss: as the submission is scored (its columns, clipped to predict.eps); log_loss_model: over the "
          "model's classes")


def _demo(args: argparse.Namespace) -> None:
    from carclf.demo.run import run_demo

    run_demo(Path(args.out), overwrite=args.overwrite, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carclf", description="Fine-grained car-model recognition: train, calibrate, "
                                "predict and evaluate on the competition's class-folder layout.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="split the data into folds and train some or all of them")
    t.add_argument("-c", "--config", help="YAML recipe (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.root=DATA train.folds=all")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run, add folds to it, or start it if missing (one process per fold)")
    t.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run of this name first (only a folder carclf made, holding only its files)")
    t.set_defaults(func=_train)

    pp = sub.add_parser("prepare", help="check the data: manifest, bad files, duplicates, conflicts, leaks")
    pp.add_argument("data", help="data root holding train/ (and test.csv, test/)")
    pp.add_argument("-c", "--config", help="YAML recipe whose data.* policies to use")
    pp.add_argument("--out-dir", default="runs", help="writes into OUT_DIR/prepare/<data folder name>/")
    pp.add_argument("--report", action="store_true", help="also write report.html with plots and thumbnails")
    pp.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.near_threshold=4 data.cross_class=keep")
    pp.set_defaults(func=_prepare)

    c = sub.add_parser("calibrate", help="fit a temperature per fold on its out-of-fold logits")
    c.add_argument("run", help="run directory, e.g. runs/lite0")
    c.set_defaults(func=_calibrate)

    pr = sub.add_parser("predict", help="write a submission from every fold of a run")
    pr.add_argument("run")
    pr.add_argument("--data", required=True, help="data root holding test.csv, test/ and sample_submission.csv")
    pr.add_argument("-o", "--output", default="submission.csv")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=_predict)

    e = sub.add_parser("evaluate", help="out-of-fold log loss, accuracy, top-5 and ECE per fold and overall")
    e.add_argument("run")
    e.set_defaults(func=_evaluate)

    d = sub.add_parser("demo", help="generate synthetic car photos and run train -> calibrate -> predict -> evaluate")
    d.add_argument("--out", default="runs/demo", help="folder for the demo's data and run")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --out (only a folder the demo made)")
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CarclfError as exc:
        print(f"carclf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"carclf {args.command}: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
