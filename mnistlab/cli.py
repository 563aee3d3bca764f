"""The `mnistlab` command: parses arguments and calls the library; no logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer vendors click from 0.2x on; its exceptions live there
    from typer._click import exceptions as cli_errors
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as cli_errors

from mnistlab.core.config import FLAGS, MAX_THREADS
from mnistlab.util.errors import UserError

app = typer.Typer(help="Search for small, accurate MNIST networks; every experiment tracked.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="The MNIST cache: build it, inspect it.", no_args_is_help=True)
model_app = typer.Typer(help="Inspect networks of the model family.", no_args_is_help=True)
study_app = typer.Typer(help="Optuna studies: run them, look at them.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(study_app, name="study")

DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="Data cache folder (env: MNISTLAB_DATA_DIR; default: ~/.cache/mnistlab).")]
Overrides = Annotated[list[str] | None, typer.Argument(
    help="Config overrides as dotted key=value, e.g. train.lr=0.02 model.widths=[8,16,8,16,16,16].")]
Storage = Annotated[str | None, typer.Option(
    help="Optuna storage URL (env: MNISTLAB_STORAGE; default: sqlite:///optuna.db here).")]
TrackingUri = Annotated[str | None, typer.Option(
    help="MLflow tracking URI (env: MLFLOW_TRACKING_URI; default: sqlite:///mlflow.db here).")]
Wait = Annotated[float, typer.Option(
    min=0, envvar="MNISTLAB_WAIT",
    help="Seconds to wait for the storage and MLflow server to come up.")]
StudyFile = Annotated[Path | None, typer.Argument(help="Study YAML file.", show_default=False)]
StudyName = Annotated[str | None, typer.Option("--name", help="Study name, instead of a study file.")]
Artifacts = Annotated[Path, typer.Option(help="Folder for trial checkpoints and plots.")]
_debug = False
MAX_WORKERS = 1024  # --worker-index: far beyond any machine (--workers is checked against the machine itself)


def _version(value: bool) -> None:
    if value:
        from mnistlab.doctor import versions_line

        print(versions_line())
        raise typer.Exit(0)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
          version: Annotated[bool, typer.Option(
              "--version", callback=_version, is_eager=True,
              help="Print the versions of mnistlab, torch (CPU or CUDA build), Optuna and MLflow, and exit.")] = False,
          ) -> None:
    global _debug
    _debug = debug


def _data_dir(value: Path | None) -> Path:
    from mnistlab.core.data import default_data_dir

    return value or default_data_dir()


@data_app.command("prepare")
def data_prepare(
    data_dir: DataDir = None,
    source: Annotated[Path | None, typer.Option(
        help="A folder in torchvision's MNIST layout to read instead of the IDX files mnistlab ships.")] = None,
) -> None:
    """Build the uint8 MNIST cache once; print split sizes and per-class counts."""
    from mnistlab.core import data

    data.prepare_and_describe(_data_dir(data_dir), source)


@data_app.command("info")
def data_info(data_dir: DataDir = None) -> None:
    """Where the cache is, its size and its SHA-256."""
    from mnistlab.core import data

    data.describe_cache(_data_dir(data_dir))


@model_app.command("summary")
def model_summary(experiment: Path, overrides: Overrides = None) -> None:
    """Print the torchsummary-style table of an experiment's network."""
    from mnistlab.core import config

    cfg = config.load(experiment, overrides or [])
    from mnistlab.core import model  # torch: only once the file is read

    print(model.summary(cfg.model))


@app.command("train")
def train_cmd(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    overrides: Overrides = None,
    epochs: Annotated[int | None, typer.Option(help=f"Override {FLAGS['epochs']}.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Override {FLAGS['seed']}.")] = None,
    limit_train: Annotated[int | None, typer.Option(help="Train on the first N images.")] = None,
    limit_eval: Annotated[int | None, typer.Option(help="Evaluate on the first N images.")] = None,
    data_dir: DataDir = None,
    output: Annotated[Path | None, typer.Option(
        help="Run folder for config, metrics and checkpoints (default: runs/NAME-TIME).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --output.")] = False,
    tracking_uri: TrackingUri = None,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
) -> None:
    """Train one experiment, log it to MLflow and print a summary."""
    from mnistlab.core import config

    cfg = config.resolve(experiment, overrides or [], epochs=epochs, device=device, seed=seed,
                         limit_train=limit_train, limit_eval=limit_eval)
    from mnistlab import train_command as exp  # torch and MLflow: only once the file is read

    exp.train_command(cfg, experiment, output, data_dir, tracking_uri, track=track, resume=resume)


@study_app.command("run")
def study_run(
    study_file: Annotated[Path, typer.Argument(help="Study YAML file.")],
    n_trials: Annotated[int | None, typer.Option(min=1, help="Trained trials the study should have in all "
                                                              "(over-budget configs do not count).")] = None,
    timeout: Annotated[float | None, typer.Option(min=1, help="Stop starting trials after S seconds.")] = None,
    stop_val_score: Annotated[float | None, typer.Option(
        help="Stop every worker once a configuration's validation score reaches this % (the file's stop.val_score).")
    ] = None,
    stop_minutes: Annotated[float | None, typer.Option(
        help="Stop every worker once the study is this many minutes old (the file's stop.minutes).")] = None,
    storage: Storage = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes on this machine (one GPU "
                                         "each); at most its cores (or GPUs) and what its memory holds.")] = 1,
    oversubscribe: Annotated[bool, typer.Option(
        "--oversubscribe", envvar="MNISTLAB_OVERSUBSCRIBE",
        help="Start --workers beyond the cores or memory anyway.")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps for every trial.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help=f"Override {FLAGS['epochs']}.")] = None,
    limit_train: Annotated[int | None, typer.Option(min=1, help="Train on the first N images.")] = None,
    limit_eval: Annotated[int | None, typer.Option(min=1, help="Evaluate on the first N images.")] = None,
    tracking_uri: TrackingUri = None,
    data_dir: DataDir = None,
    artifacts: Artifacts = Path("mnistlab-artifacts"),
    heartbeat: Annotated[int, typer.Option(min=1, help="Seconds between trial heartbeats.")] = 30,
    threads: Annotated[int, typer.Option(min=0, max=MAX_THREADS,
                                         help="Torch threads per worker (0: split the cores).")] = 0,
    verbose: Annotated[bool, typer.Option(help="Per-epoch lines and progress bars.")] = False,
    wait: Wait = 0,
    worker_index: Annotated[int | None, typer.Option(
        min=0, max=MAX_WORKERS, hidden=True, help="Set by --workers in the worker processes it starts.")] = None,
    change_space: Annotated[bool, typer.Option(
        "--change-space", help="Continue a stored study although the file's search space differs from the "
                                     "one its trials were sampled from.")] = False,
) -> None:
    """Run (or continue) a study: sample, check the budget, train, log every trial to MLflow."""
    from mnistlab.search.study_file import load_study, stop_value

    cfg = load_study(study_file)
    stop_val_score = stop_value(stop_val_score, "--stop-val-score", "study run")
    stop_minutes = stop_value(stop_minutes, "--stop-minutes", "study run")
    from mnistlab.core.train import resolve_device
    from mnistlab.search import runner  # Optuna and torch: only once the file is read

    resolve_device(device or cfg.base.train.device)  # a device this machine lacks: refused before the study exists
    opts = runner.RunOptions(n_trials=n_trials, timeout=timeout, storage=storage, workers=workers, device=device,
                            epochs=epochs, limit_train=limit_train, limit_eval=limit_eval,
                            tracking_uri=tracking_uri, data_dir=data_dir, artifacts=artifacts.resolve(),
                            heartbeat=heartbeat, threads=threads, verbose=verbose, wait=wait,
                            oversubscribe=oversubscribe, worker_index=worker_index,
                            stop_val_score=stop_val_score, stop_minutes=stop_minutes,
                            space_change=change_space)
    code = runner.run(cfg, opts)
    if code:
        raise typer.Exit(code)


@study_app.command("create")
def study_create(
    study_file: Annotated[Path, typer.Argument(help="Study YAML file.")],
    storage: Storage = None,
    tracking_uri: TrackingUri = None,
    wait: Wait = 0,
) -> None:
    """Create the study, its MLflow experiment and parent run, then exit (before starting workers)."""
    from mnistlab.search.study_file import load_study

    cfg = load_study(study_file)
    from mnistlab.search import runner

    runner.create_study(cfg, runner.RunOptions(storage=storage, tracking_uri=tracking_uri, wait=wait))


def _study(study_file: Path | None, name: str | None, storage: str | None) -> Any:
    """The stored study a command names, by its file or --name (the file read before Optuna is imported)."""
    from mnistlab import find_study

    return find_study.load(study_file, name, storage)


@study_app.command("check")
def study_check(
    study_file: StudyFile = None, name: StudyName = None, storage: Storage = None, tracking_uri: TrackingUri = None,
    repair: Annotated[bool, typer.Option(
        help="Fail stale RUNNING trials and runs, send metrics kept locally, upload missing checkpoints.")] = False,
    heartbeat: Annotated[int, typer.Option(
        min=1, help="The workers' --heartbeat: a RUNNING trial silent for 3x this is stale.")] = 30,
) -> None:
    """Verify that nothing is RUNNING and every trial's MLflow record and checkpoint are whole."""
    found = _study(study_file, name, storage)
    from mnistlab.check import check_study

    code = check_study(found.study, storage, tracking_uri, repair, heartbeat)
    if code:
        raise typer.Exit(code)


@study_app.command("status")
def study_status(
    study_file: StudyFile = None, name: StudyName = None, storage: Storage = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the table to this CSV file.")] = None,
) -> None:
    """The study's trials as a table; the best (or the Pareto front) marked with *."""
    found = _study(study_file, name, storage)
    from mnistlab.search.tables import print_status

    print_status(found.study, found.objectives, csv)


@study_app.command("list")
def study_list(storage: Storage = None) -> None:
    """Studies in a storage with their trial counts and best values."""
    from mnistlab.search.storage import open_storage
    from mnistlab.search.tables import list_studies

    table = list_studies(open_storage(storage, heartbeat=None, create=False))
    print(table.to_string(index=False) if not table.empty else "no studies")


@study_app.command("report")
def study_report(
    study_file: StudyFile = None, name: StudyName = None, storage: Storage = None,
    tracking_uri: TrackingUri = None, artifacts: Artifacts = Path("mnistlab-artifacts"),
) -> None:
    """Draw the study's plots and attach them to its MLflow parent run."""
    found = _study(study_file, name, storage)
    from mnistlab import find_study
    from mnistlab.search import runner

    runner.report_study(found.study, found.objectives, find_study.tracker(found.study, tracking_uri), artifacts)


@app.command("best")
def best(
    study_file: StudyFile = None, name: StudyName = None, storage: Storage = None,
    min_accuracy: Annotated[float | None, typer.Option(
        min=0, max=100, help="Fewest params among trials with at least this validation accuracy (%).")] = None,
    max_params: Annotated[int | None, typer.Option(
        min=1, help="Highest validation accuracy among trials with at most N params.")] = None,
    export: Annotated[Path | None, typer.Option(
        help="Write the model here: safetensors, TorchScript, ONNX, config.json, MODEL_CARD.md.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an earlier export in --export (and nothing else).")] = False,
    register: Annotated[bool, typer.Option(
        help="With --export, also register the model in MLflow as models:/STUDY@best.")] = True,
    refit: Annotated[bool, typer.Option(
        "--refit", help="Retrain the pick on the training and validation images together (all 60,000 unless "
        "the study limits them; its own recipe), --seeds times; read the "
        "test set once per seed. --export then delivers the refit of the pick's own seed.")] = False,
    seeds: Annotated[int, typer.Option(min=1, max=100, help="Seeds for --refit (its own seed, then the next).")] = 3,
    artifacts: Artifacts = Path("mnistlab-artifacts"),
    tracking_uri: TrackingUri = None,
    data_dir: DataDir = None,
) -> None:
    """Print a study's best trial; --refit retrains it on all data; --export delivers it, verified in every format."""
    found = _study(study_file, name, storage)
    from mnistlab.best import flow

    code = flow.best(found, flow.BestOptions(
        min_accuracy=min_accuracy, max_params=max_params, export=export, force=force, register=register, refit=refit,
        seeds=seeds, artifacts=artifacts, tracking_uri=tracking_uri, data_dir=data_dir))
    if code:
        raise typer.Exit(code)


@app.command("evaluate")
def evaluate_cmd(
    folder: Annotated[Path, typer.Argument(help="A folder written by `mnistlab best --export`.")],
    data_dir: DataDir = None,
    trusted: Annotated[bool, typer.Option("--trusted", help="Also load model.torchscript.pt. A TorchScript "
                                          "file is code that runs as it loads: only for a folder you trust.")] = False,
) -> None:
    """Re-measure an exported model's test accuracy from its files alone: the safetensors weights with
    the config's architecture and the ONNX graph (TorchScript too with --trusted)."""
    from mnistlab.best import flow

    flow.evaluate(folder, data_dir, trusted)


@app.command("doctor")
def doctor(
    storage: Storage = None,
    tracking_uri: TrackingUri = None,
    data_dir: DataDir = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps: the device to check.")] = None,
) -> None:
    """What mnistlab sees here: versions, torch's build, devices, workers, the data cache, the storage and
    tracking store (servers asked whether they answer; passwords masked). Exit 1 if any of it is unusable."""
    from mnistlab.doctor import run

    raise typer.Exit(run(_data_dir(data_dir), storage, tracking_uri, device))


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the UI to the network.")] = "127.0.0.1",
    tracking_uri: TrackingUri = None,
    auth: Annotated[bool, typer.Option(help="Require a login: MLflow's basic-auth app, set up as in "
                                            "docker-compose.auth.yml.")] = False,
) -> None:
    """Start the MLflow web UI over mnistlab's tracking store and print its address."""
    from mnistlab.tracking.server import serve_ui

    raise typer.Exit(serve_ui(tracking_uri, host, port, auth))


MAX_ERROR_CHARS = 2000  # a message quoting a hostile input stays readable (values in it are cut to 200)


def _one_line(text: str) -> str:
    """An error message as one bounded line with every credential masked."""
    from mnistlab.tracking.uri import mask

    line = mask(" ".join(text.split()))
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def _plain_flags(command: Any) -> Any:
    """typer labels on/off flags (``--debug``, ``--help``, ``--verbose/--no-verbose``) ``<bool>`` in --help, as
    if they took a value; an empty metavar leaves their type column blank. Walks the sub-commands too."""
    options = [*command.params, command.get_help_option(command.context_class(command))]
    for option in options:
        if getattr(option, "is_bool_flag", False) and option.metavar is None:
            option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)
    return command


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input is one line on stderr and exit code 2; --debug shows tracebacks."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("MNISTLAB_DEBUG") == "1"
    command = _plain_flags(typer.main.get_command(app))
    try:
        code = command.main(args=args, prog_name="mnistlab", standalone_mode=False)
        if isinstance(code, int) and code:  # a command's typer.Exit(code) comes back as a return value
            sys.exit(code)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except cli_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        sys.exit(2)
    except cli_errors.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        print(f"error: {_one_line(exc.format_message())}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # an MLflow server's refusal: one line too
        if debug or type(exc).__name__ != "MlflowException":
            raise
        from mnistlab.tracking.tracker import describe_error

        print(f"error: MLflow: {_one_line(describe_error(exc))}", file=sys.stderr)
        sys.exit(2)
