"""The ``diffpg`` command line: ``diffpg compare ...``.

Options are generated from the settings dataclasses, with the documentation written under each
field as their help. A user error (bad setting, existing output folder) prints one line naming
the setting and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import time
import types
import typing
from pathlib import Path

from diffpg.compare import CompareSettings
from diffpg.train import TrainingStopped, TrainSettings


def field_docs(settings_class: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass (its documentation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(settings_class)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _converter(annotation):
    """argparse ``type`` for a field annotation (int, float, str, bool, tuples, optionals)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)][0]
        convert = _converter(inner)
        return lambda text: None if text.lower() == "none" else convert(text)
    if origin is tuple:
        item = _converter(args[0])
        return lambda text: tuple(item(part) for part in text.split(",") if part.strip())
    if annotation is bool:
        return _parse_bool
    return annotation


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def add_settings_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    # argparse %-formats help strings: a literal % must be doubled.
    docs = {name: doc.replace("%", "%%") for name, doc in field_docs(settings_class).items()}
    hints = typing.get_type_hints(settings_class)
    for field in dataclasses.fields(settings_class):
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        # Tuples of strings are given comma-separated, except estimator specs which contain
        # commas themselves: those take one spec per argument.
        if field.name == "estimators":
            parser.add_argument("--estimators", nargs="+", default=None, metavar="SPEC",
                                help=f"{docs.get(field.name, '')} (default: {' '.join(default)})")
            continue
        parser.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, default=None,
            type=_converter(hints[field.name]), metavar=field.name.upper(),
            help=f"{docs.get(field.name, '')} (default: {shown})",
        )


def settings_from_arguments(arguments: argparse.Namespace, settings_class: type):
    values = {f.name: getattr(arguments, f.name) for f in dataclasses.fields(settings_class)
              if getattr(arguments, f.name, None) is not None}
    if "estimators" in values:
        values["estimators"] = tuple(values["estimators"])
    return settings_class(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffpg",
        description="Policy-gradient estimators (REINFORCE, critic backprop, BPTT, SHAC) "
                    "compared on the same policy and states.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare", help="variance, bias and cost of every estimator, against the horizon",
        description="Compare gradient estimators on the same policy and start states; writes "
                    "results.json, table.csv, plots and report.md into --out.",
    )
    add_settings_arguments(compare, CompareSettings)
    compare.add_argument("--out", type=Path, default=None,
                         help="output folder (default: runs/compare-ENV-TIMESTAMP)")
    compare.add_argument("--overwrite", action="store_true",
                         help="write into --out even if it exists")

    train = commands.add_parser(
        "train", help="train a policy with any estimator (one loop for all)",
        description="Train a policy; writes settings.json, metrics.csv and checkpoints into --out.",
    )
    add_settings_arguments(train, TrainSettings)
    train.add_argument("--out", type=Path, default=None,
                       help="run folder (default: runs/train-ENV-ESTIMATOR-TIMESTAMP)")
    train.add_argument("--overwrite", action="store_true", help="write into an existing --out")
    train.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                       help="continue RUN_DIR from its latest checkpoint, with its settings")

    evaluate = commands.add_parser("eval", help="evaluate the latest checkpoint of a training run")
    evaluate.add_argument("run_dir", type=Path)

    video = commands.add_parser(
        "video", help="an animated GIF of a training run's latest policy (offline, matplotlib)")
    video.add_argument("run_dir", type=Path)
    video.add_argument("--out", type=Path, default=None, help="GIF path (default: RUN_DIR/policy.gif)")
    video.add_argument("--every", type=int, default=1, help="draw every N-th step (long episodes)")
    return parser


def _prepare_output(out: Path | None, overwrite: bool, default_name: str) -> Path:
    if out is None:
        out = Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out={str(out)!r} exists and is not empty; pass --overwrite to "
                         "write into it, or choose another --out")
    return out


def run_compare(arguments: argparse.Namespace) -> Path:
    from tqdm import tqdm

    from diffpg.compare import run_comparison
    from diffpg.report import write_outputs

    settings = settings_from_arguments(arguments, CompareSettings)
    out = _prepare_output(arguments.out, arguments.overwrite, f"compare-{settings.env}")
    total = len(settings.points) * (len(settings.estimators) + 1)
    with tqdm(total=total, desc="compare", unit="task", file=sys.stderr) as bar:
        def progress(message: str) -> None:
            bar.set_description(message)
            bar.update(1)

        results = run_comparison(settings, progress=progress)
    written = write_outputs(results, out)
    print(f"wrote {len(written)} files to {out}:")
    for path in written:
        print(f"  {path}")
    print((out / "report.md").read_text().split("## Reading")[0].split("## At horizon")[-1])
    return out


def run_train(arguments: argparse.Namespace) -> Path:
    from tqdm import tqdm

    from diffpg.train import load_settings, train

    if arguments.resume is not None:
        settings, out, resume = load_settings(arguments.resume), arguments.resume, True
    else:
        settings = settings_from_arguments(arguments, TrainSettings)
        out = _prepare_output(arguments.out, arguments.overwrite,
                              f"train-{settings.env}-{settings.estimator}")
        resume = False
    with tqdm(total=settings.updates, desc="train", unit="update", file=sys.stderr) as bar:
        def on_log(row: dict) -> None:
            bar.n = row["update"]
            bar.set_postfix(reward=f"{row['eval/episode_reward']:.4g}",
                            sps=f"{row['training/sps']:.3g}")
            bar.refresh()

        try:
            state = train(settings, out, resume=resume, on_log=on_log)
        except KeyboardInterrupt:
            print(f"\ninterrupted; the last checkpoint is kept: continue with "
                  f"diffpg train --resume {out}", file=sys.stderr)
            raise SystemExit(130) from None
    print(f"{int(state.update)} updates, {int(state.env_steps)} env steps; run folder: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        from diffpg.devices import initialize_distributed_from_environment

        initialize_distributed_from_environment()
        if arguments.command == "compare":
            run_compare(arguments)
        elif arguments.command == "train":
            run_train(arguments)
        elif arguments.command == "eval":
            from diffpg.train import evaluate_run

            for name, value in evaluate_run(arguments.run_dir).items():
                print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")
        elif arguments.command == "video":
            from diffpg.video import video_of_run

            if arguments.every < 1:
                raise ValueError(f"every={arguments.every} must be a positive integer")
            print(f"wrote {video_of_run(arguments.run_dir, arguments.out, arguments.every)}")
    except ValueError as error:
        print(f"diffpg {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"diffpg {arguments.command}: stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
