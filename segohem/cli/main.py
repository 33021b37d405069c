"""The `segohem` command line: parse arguments and dispatch to the commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from segohem import __version__
from segohem.config import SPLITS, Config, ConfigError, describe_config, load_config
from segohem.disk import ADVICE, DISK_FULL

# paths given that cannot be used as they are: one line naming the path, exit status 2
BAD_PATH = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)

# The commands import torch (seconds): they are imported once the arguments are parsed, so that
# `segohem --help`, `--version`, a mistyped option and `train --print-config` answer at once.


def positive_int(text: str) -> int:
    """An option's whole number of at least 1 (argparse names the option when this refuses)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segohem", description="Segmentation training with pixel-level OHEM.")
    parser.add_argument("--version", action="version", version=f"segohem {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model (built-in synthetic data by default)")
    train.add_argument("--config", type=Path, help="YAML config; defaults give the synthetic demo")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from last.pt")
    train.add_argument("--print-config", action="store_true", help="print the resolved config, documented, and exit")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    ev = commands.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--split", default="val", choices=SPLITS)
    ev.add_argument("--output", type=Path, help="also write the metrics as JSON here")
    ev.add_argument("overrides", nargs="*", metavar="key.sub=value")
    pr = commands.add_parser("predict", help="write label and colour PNGs for a folder of images")
    source = pr.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path)
    source.add_argument("--model", type=Path, help="an ONNX model written by `segohem export` instead")
    pr.add_argument("--input", type=Path, required=True)
    pr.add_argument("--output", type=Path, required=True)
    pr.add_argument("overrides", nargs="*", metavar="key.sub=value")
    mi = commands.add_parser("mine", help="read-only pass over a split: exact hard masks and loss maps")
    mi.add_argument("--checkpoint", type=Path, required=True)
    mi.add_argument("--split", default="train", choices=SPLITS)
    mi.add_argument("--output", type=Path, help="store path (default: mined_<split>_<checkpoint>.sqlite beside it)")
    mi.add_argument("overrides", nargs="*", metavar="key.sub=value")
    hp = commands.add_parser("hard-pixels", help="query a run's hard-pixel dictionary")
    hp.add_argument("--run", type=Path, help="run folder (reads its hard_pixels.sqlite)")
    hp.add_argument("--store", type=Path, help="a store file instead, e.g. one written by `mine`")
    hp.add_argument("--view", default="images", choices=("images", "pairs", "classes"))
    hp.add_argument("--class", dest="class_name", help="with --view images: hardest images for this class")
    hp.add_argument("--top", type=positive_int, default=10)
    hp.add_argument("--format", default="table", choices=("table", "csv", "json"))
    vz = commands.add_parser("viz", help="gallery of hard-pixel maps and plots (PNGs + index.html)")
    vz.add_argument("--run", type=Path, required=True)
    vz.add_argument("--checkpoint", type=Path, help="default: the run's best.pt")
    vz.add_argument("--num", type=positive_int, default=8, help="the N hardest images by the dictionary")
    vz.add_argument("--ids", nargs="+", help="these sample ids instead")
    vz.add_argument("--split", default="train", choices=SPLITS)
    vz.add_argument("--output", type=Path, help="default: RUN/gallery")
    vz.add_argument("overrides", nargs="*", metavar="key.sub=value")
    ex = commands.add_parser("export", help="write a checkpoint's model as ONNX, preprocessing and classes included")
    ex.add_argument("--checkpoint", type=Path, required=True)
    ex.add_argument("--format", default="onnx", choices=("onnx",))
    ex.add_argument("--height", type=int, help="fixed input height, a multiple of augment.pad_divisor (32)")
    ex.add_argument("--width", type=int, help="fixed input width; default for both: data.resize, padded")
    ex.add_argument("--dynamic", action="store_true", help="any height and width the model takes")
    ex.add_argument("--output", type=Path, help="default: the checkpoint's path with .onnx")
    ex.add_argument("overrides", nargs="*", metavar="key.sub=value")
    up = commands.add_parser("upgrade-checkpoint", help="rewrite a checkpoint of an older segohem in today's format")
    up.add_argument("checkpoint", type=Path)
    up.add_argument("--trusted", action="store_true", help="you wrote it: reading the old format can run code")
    up.add_argument("--output", type=Path, help="default: <stem>.v2.pt beside it")
    cd = commands.add_parser("check-data", help="scan a dataset for problems; class shares and suggested weights")
    cd.add_argument("--config", type=Path)
    cd.add_argument("--split", default="all", choices=(*SPLITS, "all"))
    cd.add_argument("--format", default="table", choices=("table", "json"))
    cd.add_argument("--workers", type=positive_int, help="processes reading files (default: one per CPU core)")
    cd.add_argument("overrides", nargs="*", metavar="key.sub=value")
    rf = commands.add_parser("refine", help="a refinement stage driven by a run's hard-pixel dictionary")
    rf.add_argument("--run", type=Path, required=True, help="the base run folder")
    rf.add_argument("--checkpoint", default="last.pt", help="checkpoint in the run folder to continue from")
    rf.add_argument("--bank", type=Path, help="store driving the stage (default: the checkpoint's own bank)")
    rf.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. refine.hard_crop_prob=0.5")
    return parser


def train_config(args: argparse.Namespace) -> Config:
    """The config of ``segohem train``: a new run's, or a resumed run's own config.yaml plus overrides."""
    if args.resume is None:
        return load_config(args.config, args.overrides)
    if args.config is not None:
        raise ConfigError(
            f"--config cannot be combined with --resume: a resumed run keeps {args.resume / 'config.yaml'}; "
            f"change it with key.sub=value overrides"
        )
    base = args.resume / "config.yaml"
    if not base.is_file():
        raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run folder?")
    located = [f"run.output_dir={args.resume.parent}", f"run.name={args.resume.name}"]
    return load_config(base, [*args.overrides, *located])


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "train" and args.print_config:  # answered from the config alone, without torch
        print(describe_config(train_config(args)))
        return 0
    from segohem.cli.check_data import run_check_data
    from segohem.cli.commands import run_eval, run_hard_pixels, run_mine, run_predict, run_viz
    from segohem.cli.export import run_export, run_predict_onnx
    from segohem.cli.train import run_train
    from segohem.cli.upgrade import upgrade_checkpoint
    from segohem.engine.loop import BANK_FILE

    if args.command == "train":
        run_train(train_config(args), resume_from=args.resume)
        return 0
    if args.command == "refine":
        defaults = [f"run.output_dir={args.run.parent}", f"run.name={args.run.name}-refine",
                    f"refine.init={args.run / args.checkpoint}", f"refine.bank={args.bank or ''}"]  # fmt: skip
        run_train(load_config(args.run / "config.yaml", [*defaults, *args.overrides]), resume_from=None)
        return 0
    if args.command == "viz":
        run_viz(args.run, checkpoint=args.checkpoint, num=args.num, ids=args.ids, split=args.split,
                output=args.output, overrides=args.overrides)  # fmt: skip
        return 0
    if args.command == "mine":
        run_mine(args.checkpoint, split=args.split, output=args.output, overrides=args.overrides)
        return 0
    if args.command == "hard-pixels":
        if (args.run is None) == (args.store is None):
            raise ConfigError("give exactly one of --run DIR and --store FILE")
        if args.class_name is not None and args.view != "images":
            raise ConfigError(f"--class selects images (--view images); --view {args.view} covers every class")
        store = args.store or args.run / BANK_FILE
        run_hard_pixels(store, view=args.view, class_name=args.class_name, top=args.top, fmt=args.format)
        return 0
    if args.command == "eval":
        run_eval(args.checkpoint, split=args.split, overrides=args.overrides, output=args.output)
        return 0
    if args.command == "upgrade-checkpoint":
        upgrade_checkpoint(args.checkpoint, output=args.output, trusted=args.trusted)
        return 0
    if args.command == "export":
        run_export(args.checkpoint, fmt=args.format, output=args.output, height=args.height, width=args.width,
                   dynamic=args.dynamic, overrides=args.overrides)  # fmt: skip
        return 0
    if args.command == "check-data":
        cfg = load_config(args.config, args.overrides)
        return run_check_data(cfg, split=args.split, fmt=args.format, workers=args.workers)
    if args.model is not None:
        if args.overrides:
            raise ConfigError(f"{args.overrides[0]}: an ONNX model takes no overrides (its settings are its metadata)")
        return run_predict_onnx(args.model, input_dir=args.input, output_dir=args.output)
    return run_predict(args.checkpoint, input_dir=args.input, output_dir=args.output, overrides=args.overrides)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a known failure is one line on stderr and a non-zero exit status.

    2: bad input (config, data, checkpoint, store, a busy run folder, a path that cannot be used);
    3: training diverged; 4: a write the disk refused (full, a quota, a file size limit; what was
    saved before is intact, and a training run continues with --resume);
    141: whoever read stdout closed it (as for a command a shell's pipe ended with SIGPIPE).
    """
    parser = make_parser()
    # overrides may also follow an option (`eval --checkpoint X --split val eval.flip=true`): argparse
    # ends a command's positional overrides at its first option and leaves the rest unrecognised
    words = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(words)
    late = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    if extra != late or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "overrides"):
        among_ids = [i for i in getattr(args, "ids", None) or [] if "=" in i and "." in i.partition("=")[0]]
        if among_ids:  # viz --ids takes every word after it: the dotted key=value ones are overrides
            args.ids = [i for i in args.ids if i not in among_ids] or None
        # in the order they were given: the later of two settings of one key wins
        args.overrides = sorted([*args.overrides, *late, *among_ids], key=words.index)
    try:
        return dispatch(args)
    except BrokenPipeError:  # the reader of stdout went away (`segohem train --print-config | head`)
        # what is still buffered for stdout would raise again at exit: send it nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    except Exception as err:  # the error types are imported here: the commands import them (and torch) anyway
        from segohem.data import dataset_error_message
        from segohem.disk import DiskWriteError
        from segohem.engine.loop import TrainingDiverged
        from segohem.engine.run_folder import RunFolderBusy

        if isinstance(err, TrainingDiverged):
            print(f"segohem {args.command}: error: {err}", file=sys.stderr)
            return 3
        if isinstance(err, DiskWriteError):
            print(f"segohem {args.command}: error: {err}", file=sys.stderr)
            return 4
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            print(f"segohem {args.command}: error: {err}; {ADVICE}", file=sys.stderr)
            return 4
        # ConfigError, DatasetError, CheckpointError and StoreError are ValueErrors; the OSErrors are
        # paths that cannot be used as given (a file where a folder should be, no permission), named
        if isinstance(err, (ValueError, KeyError, RunFolderBusy, *BAD_PATH)):
            message = dataset_error_message(err)  # a DataLoader worker's error: its own last line
            if isinstance(err, KeyError) and message == str(err) and err.args and isinstance(err.args[0], str):
                message = err.args[0]  # str(KeyError) would quote it
            print(f"segohem {args.command}: error: {message}", file=sys.stderr)
            return 2
        raise
