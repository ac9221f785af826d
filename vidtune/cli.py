"""The ``vidtune`` command: subcommands map to plain functions. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

EXAMPLES = {
    "data synth": "vidtune data synth --out data/quickstart --classes 6 --videos-per-class 50 --seed 0",
    "data index": "vidtune data index videos/ --out videos/manifest.parquet",
    "preflight": "vidtune preflight --space search_spaces/quickstart.yaml --data data/quickstart",
    "sweep": "vidtune sweep --space search_spaces/quickstart.yaml --num-samples 8 --max-epochs 8",
    "promote": "vidtune promote --experiment quickstart --alias champion",
    "predict": "vidtune predict --model models:/quickstart@champion clip1.mp4 clip2.mp4 --top-k 3",
    "report": "vidtune report --experiment quickstart --out report/",
}


def _parser(name: str, sub, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name.split()[-1], help=help_text, description=help_text, epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", help="space file or shipped space name (default: quickstart)")
    p.add_argument("--data", help="manifest (.parquet), folder-per-class folder, list file or CSV")
    p.add_argument("--num-samples", type=int, help="number of trials (overrides the space)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial and ASHA's max_t")
    p.add_argument("--experiment", help="MLflow experiment (default: the space's name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--storage", help="Ray storage path or URI for trial checkpoints (default: ./ray_results)")
    p.add_argument("--address", help="Ray cluster address ('auto' on a cluster); default starts a local Ray")
    p.add_argument("--resume", action="store_true", help="continue the latest sweep of this space")
    p.add_argument("--smoke-test", action="store_true", help="2 trials, tiny data, 1-2 epochs")
    p.add_argument("--optuna-storage", help="Optuna RDB storage URL to persist the study")
    p.add_argument("--skip-preflight", action="store_true", help="do not run the preflight checks first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidtune", description="Distributed hyperparameter search for video action recognition.",
        epilog="example:\n  vidtune sweep            # the embedded quickstart, end to end",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build data sets and manifests")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = _parser("data synth", data_sub, "write a synthetic action data set as real MP4 files")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default="quickstart")
    p.add_argument("--classes", type=int)
    p.add_argument("--videos-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p = _parser("data index", data_sub, "index videos into a Parquet manifest")
    p.add_argument("source", help="folder-per-class folder, list file (path label) or CSV (path,label[,split,start,end])")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.2)

    p = _parser("preflight", sub, "check data and pipeline before a sweep")
    p.add_argument("--space")
    p.add_argument("--data")

    add_sweep_args(_parser("sweep", sub, "run a hyperparameter sweep (Ray Tune + Optuna + ASHA, MLflow)"))

    p = _parser("promote", sub, "register the best completed trial and point an alias at it")
    p.add_argument("--experiment", required=True)
    p.add_argument("--metric")
    p.add_argument("--model-name")
    p.add_argument("--alias", default="champion")
    p.add_argument("--tracking-uri")

    p = _parser("predict", sub, "top-k labels for videos, one JSON object per video")
    p.add_argument("--model", required=True, help="models:/NAME@alias, runs:/ID/checkpoint or a checkpoint folder")
    p.add_argument("videos", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--tracking-uri")

    p = _parser("report", sub, "regenerate a sweep's plots and summary from MLflow")
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", default="report")
    p.add_argument("--tracking-uri")
    return parser


def cmd_data_synth(a) -> int:
    from vidtune.data.manifest import read_manifest
    from vidtune.data.synth import synthesize

    path = synthesize(a.out, a.recipe, a.classes, a.videos_per_class, a.seed, progress=True)
    m = read_manifest(path)
    num_videos = len(set(m.column("path")))  # detection sets have one row per action
    rows = f" ({len(m)} annotated segments)" if num_videos != len(m) else ""
    print(f"wrote {num_videos} videos{rows} in {m.num_classes} classes; manifest {path}")
    return 0


def cmd_data_index(a) -> int:
    from vidtune.data.manifest import index_source

    m = index_source(a.source, val_fraction=a.val_fraction, progress=True)
    for path, reason in m.skipped:
        print(f"left out {path}: {reason}", file=sys.stderr)
    m.save(a.out)
    print(f"indexed {len(m)} videos in {m.num_classes} classes ({len(m.skipped)} left out); manifest {a.out}")
    return 0


def cmd_sweep(a) -> int:
    from vidtune.sweep import SweepOptions, run_sweep
    from vidtune.tracking import ui_hint

    opts = SweepOptions(**{k: getattr(a, k) for k in SweepOptions.__dataclass_fields__ if hasattr(a, k)})
    summary = run_sweep(opts)
    print(
        f"sweep {summary['sweep']}: {summary['trials']} trials ({summary['completed']} completed, "
        f"{summary['pruned']} pruned, {summary['failed']} failed) in {summary['wall_s']}s; "
        f"best {summary['metric']} {summary['best_value']} (run {summary['best_run_id']})"
    )
    for reason in summary.get("failure_reasons", []):
        print(f"  failure: {reason}")
    print(ui_hint(summary["tracking_uri"], summary["experiment_id"]))
    print(f"then: vidtune promote --experiment {summary['experiment']}")
    print(json.dumps(summary))
    return 0


def cmd_promote(a) -> int:
    from vidtune.tracking import promote, resolve_tracking_uri

    out = promote(resolve_tracking_uri(a.tracking_uri), a.experiment, a.metric, a.model_name, a.alias)
    print(f"registered {out['model']} version {out['version']} ({out['metric']} {out['value']:.4f}, run {out['run_id']}) as {out['uri']}")
    return 0


def cmd_predict(a) -> int:
    from vidtune.predict import Predictor
    from vidtune.tracking import download_model

    predictor = Predictor(_checkpoint_folder(download_model(a.model, a.tracking_uri)))
    for video in a.videos:
        top = predictor.predict(video, a.top_k)
        print(json.dumps({"video": video, "top_k": [{"label": n, "score": round(s, 6)} for n, s in top]}))
    return 0


def _checkpoint_folder(path: str) -> str:
    # A registered version points at checkpoint/; a run URI may point at its parent.
    nested = os.path.join(path, "checkpoint")
    return nested if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(nested) else path


def cmd_preflight(a) -> int:
    from vidtune.preflight import failed, run_preflight
    from vidtune.space import default_space_path, load_space
    from vidtune.sweep import prepare_data

    space = load_space(a.space or default_space_path())
    manifest = prepare_data(space, a.data, "data")
    findings = run_preflight(space.base, manifest)
    bad = failed(findings)
    print(f"preflight: {len(bad)} of {len({f.check for f in findings})} checks failed" if bad else "preflight: all checks passed")
    return 1 if bad else 0


def cmd_report(a) -> int:
    from vidtune.report import build_report
    from vidtune.tracking import resolve_tracking_uri

    out = build_report(resolve_tracking_uri(a.tracking_uri), a.experiment, a.out)
    print(f"report of {out['trials']} trials (parent run {out['parent_run_id']}) in {out['out']}: summary.md, trials.parquet, "
          f"plots/ ({len(out['plots'])} files)")
    return 0


COMMANDS = {
    ("data", "synth"): cmd_data_synth,
    ("data", "index"): cmd_data_index,
    ("sweep", None): cmd_sweep,
    ("promote", None): cmd_promote,
    ("predict", None): cmd_predict,
    ("preflight", None): cmd_preflight,
    ("report", None): cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS[(args.command, getattr(args, "data_command", None))]
    from vidtune.checkpoint import CheckpointError
    from vidtune.config import ConfigError
    from vidtune.data.video import VideoError
    from vidtune.preflight import PreflightError
    from vidtune.tracking import TrackingError

    user_errors = (ConfigError, CheckpointError, TrackingError, VideoError, PreflightError, FileNotFoundError, ValueError,
                   yaml.YAMLError, NotImplementedError, PermissionError)
    try:
        return handler(args)
    except user_errors as e:
        if os.environ.get("VIDTUNE_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"vidtune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vidtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
