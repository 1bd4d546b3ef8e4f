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


def _nest(args: argparse.Namespace) -> None:
    from carclf.nest import nest

    for path in nest(args.teacher, outer=args.outer, overwrite=args.overwrite):
        print(f"nested teacher: {path}")


def _prepare(args: argparse.Namespace) -> None:
    from carclf.artifacts.prepare import PrepareDir
    from carclf.config import load_config
    from carclf.data.rundata import prepare_dir, run_prepare

    cfg = load_config(args.config, [f"data.root={args.data}", f"out_dir={args.out_dir}", *args.overrides])
    prepared = run_prepare(cfg)
    s = prepared.summary
    print(f"prepare directory: {prepare_dir(cfg)}  (near-duplicate threshold {s['threshold']} bits)")
    print(json.dumps(s["counts"], ensure_ascii=False))
    if args.report:
        from carclf.analyze.prepare_report import write_report

        print(f"report: {write_report(prepared, cfg.data.root, PrepareDir(prepare_dir(cfg)).report)}")


def _calibrate(args: argparse.Namespace) -> None:
    from carclf.analyze.evaluate import format_table
    from carclf.calibrate.temperature import calibrate_run

    rows = calibrate_run(args.run)
    print(format_table(rows, ["fold", "n", "temperature", "nll_before", "nll_after"]))


def _predict(args: argparse.Namespace) -> None:
    from carclf.infer.predict import predict_run

    export_run = None
    if args.engine == "onnx":  # a run or an ensemble on ONNX Runtime: exported to a temporary folder first
        from carclf.export.exporter import onnx_predictor as export_run
    path, _ = predict_run(args.run, args.data, args.output, overwrite=args.overwrite, device=args.device,
                          engine=args.engine, export_run=export_run)
    print(f"wrote {path}")


def _export(args: argparse.Namespace) -> None:
    from carclf.export.exporter import export_model

    path = export_model(args.source, args.output, int8=args.int8, overwrite=args.overwrite,
                        parity_photos=args.parity_photos, eval_photos=args.eval_photos,
                        precision_request=args.precision, max_loss_increase=args.max_loss_increase,
                        speed_batch=args.speed_batch)
    import shlex

    print(f"wrote {path.parent} ({path.name} describes it; serve it with carclf serve {shlex.quote(str(path.parent))})")


def _serve(args: argparse.Namespace) -> None:
    from carclf.serve.app import MiB, ServeSettings
    from carclf.serve.server import serve

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_files=args.max_files,
                             max_file_bytes=int(args.max_file_mb * MiB), max_pixels=args.max_pixels,
                             body_timeout_s=args.body_timeout, max_upload_bytes=int(args.max_upload_mb * MiB))
    serve(args.source, host=args.host, port=args.port, workers=args.workers, api_key_env=args.api_key_env,
          precision="int8" if args.int8 else args.precision, threads=args.threads, settings=settings,
          shutdown_timeout=args.shutdown_timeout,
          keep_alive_timeout=args.keep_alive_timeout)


def _ensemble(args: argparse.Namespace) -> None:
    from carclf.ensemble.build import build_ensemble

    build_ensemble(args.members, args.output, overwrite=args.overwrite, cv_folds=args.cv_folds, cv=args.cv,
                   nested_cv=args.nested, seed=args.seed, threads=args.threads)


def _evaluate(args: argparse.Namespace) -> None:
    from carclf.analyze.evaluate import evaluate_run, format_table

    rows = evaluate_run(args.run)
    print(format_table(rows, EVAL_COLUMNS))
    print("log_loss: as the submission is scored (its columns, clipped to predict.eps); log_loss_model: over the "
          "model's classes")


def _report(args: argparse.Namespace) -> None:
    from carclf.analyze.report import write_report

    print(f"report: {write_report(args.run, args.output, overwrite=args.overwrite, device=args.device)}")


def _demo(args: argparse.Namespace) -> None:
    from carclf.demo.run import run_demo

    run_demo(Path(args.out), overwrite=args.overwrite, overrides=args.overrides)


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="split the data into folds and train some or all of them")
    t.add_argument("-c", "--config", help="YAML recipe (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.root=DATA train.folds=all")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run, add folds to it, or start it if missing (one process per fold)")
    t.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run of this name first (only a folder carclf made, holding only its files)")
    t.set_defaults(func=_train)


def _add_nest(sub: argparse._SubParsersAction) -> None:
    n = sub.add_parser("nest", help="a teacher's nested models (fold k left out, for each k): the honest targets of a "
                       "distilled student (distill.targets=nested)")
    n.add_argument("teacher", help="run directory or ensemble folder; writes <teacher>-outer<k> beside it")
    n.add_argument("--outer", default="all", help="the folds to leave out, e.g. 0 or 0,2 (default: all)")
    n.add_argument("--overwrite", action="store_true",
                   help="train the nested runs (an ensemble: rebuild the nested ensembles) again from scratch; "
                        "without it, they resume where they stopped")
    n.set_defaults(func=_nest)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    pp = sub.add_parser("prepare", help="check the data: manifest, bad files, duplicates, conflicts, leaks")
    pp.add_argument("data", help="data root holding train/ (and test.csv, test/)")
    pp.add_argument("-c", "--config", help="YAML recipe whose data.* policies to use")
    pp.add_argument("--out-dir", default="runs", help="writes into OUT_DIR/prepare/<data folder name>/")
    pp.add_argument("--report", action="store_true", help="also write report.html with plots and thumbnails")
    pp.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.near_threshold=4 data.cross_class=keep")
    pp.set_defaults(func=_prepare)


def _add_run_command(sub: argparse._SubParsersAction, name: str, help_: str, run_help: str, func) -> None:
    """A command whose one argument is the run (calibrate, evaluate)."""
    c = sub.add_parser(name, help=help_)
    c.add_argument("run", help=run_help)
    c.set_defaults(func=func)


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    _add_run_command(sub, "calibrate", "fit a temperature per fold on its out-of-fold logits",
                     "run directory, e.g. runs/lite0", _calibrate)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="write a submission from every fold of a run, or from an ensemble")
    pr.add_argument("run", help="run directory, ensemble folder or export folder")
    pr.add_argument("--data", required=True, help="data root holding test.csv, test/ and sample_submission.csv")
    pr.add_argument("-o", "--output", default="submission.csv")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                    help="onnx: ONNX Runtime (a run is exported to a temporary folder first; an export dir as is)")
    pr.set_defaults(func=_predict)


def _add_export(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="ONNX graphs of every fold engine (TTA inside), parity-checked; bf16 / int8 "
                                           "engines chosen by speed on this CPU")
    ex.add_argument("source", help="run directory or ensemble folder")
    ex.add_argument("-o", "--output", required=True, help="export folder (export.yaml + one .onnx per engine)")
    ex.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "int8"],
                    help="auto: also make bf16 (where the CPU has AVX512-BF16/AMX) and int8 engines, time each here "
                    "and choose the fastest within --max-loss-increase; bf16 / int8: make and choose that one")
    ex.add_argument("--max-loss-increase", type=float, default=0.01, metavar="X",
                    help="auto keeps a lower precision only if its OOF log loss rises by at most X (default 0.01)")
    ex.add_argument("--speed-batch", type=int, default=32, help="photos per batch when timing the precisions")
    ex.add_argument("--int8", nargs="?", const="static", choices=["static", "dynamic"],
                    help="int8 quantisation (static: calibrated on training photos; the default); alone: also write "
                    "int8 graphs beside the fp32 ones and print their change in OOF log loss and accuracy")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in -o (only what it wrote)")
    ex.add_argument("--parity-photos", type=int, default=8, help="OOF photos for the PyTorch/ONNX parity check")
    ex.add_argument("--eval-photos", type=int, default=256, help="OOF photos per fold scoring the bf16 / int8 engines")
    ex.set_defaults(func=_export)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="HTTP API + upload page for a run or an export (FastAPI + uvicorn)")
    sv.add_argument("source", help="export folder (ONNX Runtime), or run directory or ensemble folder (PyTorch)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="processes (each loads the model; cores shared out)")
    sv.add_argument("--api-key-env", metavar="VAR", help="require header X-API-Key equal to environment variable VAR")
    sv.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                    help="run the export at this precision (default: the one it chose when exported; fp32 where this "
                    "CPU lacks its instructions)")
    sv.add_argument("--int8", action="store_true", help="the same as --precision int8")
    sv.add_argument("--threads", type=int, help="inference threads per worker (default: physical cores / workers)")
    sv.add_argument("--max-batch", type=int, default=8,
                    help="photos per micro-batch (8 suits CPUs, where larger batches add latency, not speed; raise it "
                    "on a GPU)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a micro-batch waits for more photos")
    sv.add_argument("--max-files", type=int, default=16, help="photos per request")
    sv.add_argument("--max-file-mb", type=float, default=10.0, help="size limit per photo")
    sv.add_argument("--max-pixels", type=int, default=40_000_000,
                    help="width x height limit per photo, checked from the header (0: none). Below training's "
                    "data.max_pixels (90 MP) on purpose: a 90 MP photo is 270 MB of RGB per request in flight")
    sv.add_argument("--max-upload-mb", type=float, default=256.0,
                    help="request-body bytes all uploads in flight may hold together (more: 503 busy, Retry-After)")
    sv.add_argument("--body-timeout", type=float, default=60.0,
                    help="seconds a request's whole body may take to arrive (slower: 408)")
    sv.add_argument("--keep-alive-timeout", type=float, default=5.0,
                    help="seconds an idle keep-alive connection stays open")
    sv.add_argument("--shutdown-timeout", type=float, default=20.0,
                    help="seconds requests in flight get to finish after SIGTERM before they are cancelled")
    sv.set_defaults(func=_serve)


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    en = sub.add_parser("ensemble", help="combine runs (or some of their folds) into an ensemble chosen on "
                        "cross-validated out-of-fold log loss: weights, space, TTA, calibration, clipping")
    en.add_argument("members", nargs="+", metavar="RUN", help="run directory, or RUN:FOLDS (e.g. runs/a:0,2)")
    en.add_argument("-o", "--output", required=True, help="ensemble folder (ensemble.yaml, oof.npz)")
    en.add_argument("--overwrite", action="store_true", help="replace an earlier ensemble in -o (only its files)")
    en.add_argument("--cv-folds", type=int, default=5, help="parts of the OOF rows for cross-validating each choice")
    en.add_argument("--cv", choices=["grouped", "stratified"], default="grouped",
                    help="grouped: by the first member's training folds (default); stratified: by class")
    en.add_argument("--nested", action="store_true",
                    help="also cross-validate the whole selection (every stage re-chosen per part; ~K times slower)")
    en.add_argument("--seed", type=int, default=0, help="seed of the stratified parts")
    en.add_argument("--threads", type=int, default=1, help="BLAS threads for the fits")
    en.set_defaults(func=_ensemble)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    _add_run_command(sub, "evaluate", "out-of-fold log loss, accuracy, top-5 and ECE per fold and overall",
                     "run directory or ensemble folder", _evaluate)


def _add_report(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="error analysis from out-of-fold predictions: report.html, confusable groups, "
                       "likely label errors")
    r.add_argument("run", help="run directory or ensemble folder")
    r.add_argument("-o", "--output", help="report folder (default: RUN/report)")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier report in that folder")
    r.add_argument("--device", default="auto", help="for features of runs that predate stored features")
    r.set_defaults(func=_report)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="generate synthetic car photos and run train -> calibrate -> predict -> evaluate")
    d.add_argument("--out", default="runs/demo", help="folder for the demo's data and run")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --out (only a folder the demo made)")
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe")
    d.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carclf", description="Fine-grained car-model recognition: train, calibrate, "
                                "predict and evaluate on the competition's class-folder layout.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_nest, _add_prepare, _add_calibrate, _add_predict, _add_export, _add_serve,
                _add_ensemble, _add_evaluate, _add_report, _add_demo):  # one function a command, in --help's order
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CarclfError as exc:
        print(f"carclf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "run it again to continue" if args.command == "nest" else "a training run continues with --resume"
        print(f"carclf {args.command}: interrupted ({again})", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
