"""Studies: the budget before any work, a real SQLite study that resumes, PostgreSQL workers."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, cli, one_line_error, run_cli
from mnistlab.core import trials as tr
from mnistlab.search import objective as objective_mod
from mnistlab.search import runner
from mnistlab.search.storage import create, load, open_storage
from mnistlab.search.study_file import check_name, load_study, worker_salt
from mnistlab.util.errors import UserError
from mnistlab.util.keys import ID_ATTR

SMOKE = ROOT / "studies" / "smoke.yaml"
FAST = ["--epochs", "1", "--limit-train", "1000", "--limit-eval", "500"]


def study_file(tmp_path: Path, body: str, name: str = "s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: {ROOT / 'experiments' / 'eva4-s4.yaml'}\n" + body)
    return path


def test_objective_through_a_fixed_trial(data_dir: Path, tmp_path: Path) -> None:
    cfg = load_study(SMOKE)
    params = {"model.dropout": 0.0, "train.lr": 0.1, "model.widths.1": 16, "model.widths.3": 12}
    obj = objective_mod.Objective(cfg, extra={"train.epochs": 1, "data.limit_train": 2000, "data.limit_eval": 1000},
                                  data_dir=data_dir, artifacts=tmp_path)
    trial = optuna.trial.FixedTrial(params)
    value = obj(trial)
    assert 20.0 < value <= 100.0  # learning (chance is 10%)
    assert trial.user_attrs["param_count"] == 9_064  # 12,400 less what narrower convs 2 and 4 drop
    assert trial.user_attrs["best_val_acc"] == value and trial.user_attrs["epochs_run"] == 1
    assert (tmp_path / "smoke" / "trial-0" / "best.safetensors").is_file()


def test_over_budget_configs_never_reach_the_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(objective_mod, "tracked_train", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(objective_mod.Objective, "data_for", lambda self, cfg: calls.append(cfg))
    cfg = load_study(study_file(tmp_path, """
max_params: 9000
enqueue_base: false
space:
  model.widths.1: {type: int, low: 40, high: 64}
  model.widths.4: {type: int, low: 4, high: 8}
"""))
    # The smallest config of this space, widths.1 = 40 and widths.4 = 4, has 10,152 params.
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat=None)
    with pytest.raises(UserError, match="over the budget"):
        runner.run(cfg, runner.RunOptions(n_trials=1, storage=f"sqlite:///{tmp_path / 'o.db'}"))
    cfg = load_study(study_file(tmp_path, """
max_params: 12000
enqueue_base: false
space:
  model.widths.1: {type: int, low: 8, high: 64}
"""))
    s = create(cfg, storage)
    for width in (60, 64, 48):
        s.enqueue_trial({"model.widths.1": width})
    s.optimize(objective_mod.Objective(cfg, n_trials=1), n_trials=3)
    trials = s.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert all(t.user_attrs["reason"].startswith("over budget:") for t in trials)
    # 12,400 - (conv2 + bn2 + conv3 at width 32) + 154 per unit of widths.1
    assert [t.user_attrs["param_count"] for t in trials] == [7_472 + 154 * w for w in (60, 64, 48)]
    assert not any(t.user_attrs.get("trained") for t in trials)
    assert calls == []  # no data, no model, no optimiser


@pytest.mark.parametrize(("body", "message"), [
    ("max_params: 1000\nspace: {model.widht: {type: int, low: 1, high: 2}}", "unknown config name 'model.widht'"),
    ("max_params: 1000\nspace: {model.dropout: {type: float, low: 0.5, high: 0.1}}", "low 0.5 > high 0.1"),
    ("max_params: 1000\nspace: {model.head: {type: categorical, choices: []}}", "non-empty choices"),
    ("max_params: 1000\nsampler: cmaes\nspace: {train.lr: {type: float, low: 0.1, high: 0.2}}",
     "unknown sampler 'cmaes'"),
    ("max_params: 1000\npruner: {name: asha}\nspace: {train.lr: {type: float, low: 0.1, high: 0.2}}",
     "unknown pruner 'asha'"),
    ("max_params: 1000\nspace: {train.lr: {type: gauss, low: 0.1, high: 0.2}}", "type must be float, int"),
    ("space: {train.lr: {type: float, low: 0.1, high: 0.2}}", "missing key 'max_params'"),
    ("max_params: 1000\nn_trails: 3\nspace: {train.lr: {type: float, low: 0.1, high: 0.2}}",
     "unknown key 'n_trails'"),
    ("max_params: 9000\nobjectives: 3\nspace: {train.lr: {type: float, low: 0.1, high: 0.2}}",
     "objectives must be a list of metric names"),
    ("max_params: 9000\nobjectives: [[val_acc]]\nspace: {train.lr: {type: float, low: 0.1, high: 0.2}}",
     "objectives must be a list of metric names"),
    ("max_params: 99000\noverrides: {model.width_mult: .inf}\nspace: {train.lr: {type: float, low: 0.1, high: 0.2}}",
     "'.inf' is not a finite number"),
    ("max_params: 9000\npruner: {name: hyperband, reduction_factor: 0}\nn_trials: 1\n"
     "space: {train.lr: {type: float, low: 0.1, high: 0.2}}", "pruner.reduction_factor must be 2..1000; got 0"),
    ("max_params: 9000\nsampler: {name: tpe, seed: 1180591620717411303424}\n"
     "space: {train.lr: {type: float, low: 0.1, high: 0.2}}", "sampler.seed must be 0..4294967295"),
    ("max_params: 9000\nspace: {train.lr: {type: float, low: 0.1, high: 1" + "0" * 400 + "}}",
     "high must be a number within ±1e+12"),
    ("max_params: 9000\nname: t\nspace: {train.lr: {type: float, low: 0.1, high: 0.2}}",
     "key 'name' appears twice"),
])
def test_bad_study_files_exit_2_and_create_nothing(capsys: pytest.CaptureFixture, tmp_path: Path, body: str,
                                                   message: str) -> None:
    code, _, err = cli(capsys, "study", "run", str(study_file(tmp_path, body)))
    one_line_error(code, err, message)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["study", "run", str(SMOKE), "--storage", "redis://x"], "storage URL 'redis://x'"),
    (["study", "run", str(SMOKE), "--storage", "postgresql://nobody:secret@127.0.0.1:1/x"], "cannot open"),
    (["study", "run", str(SMOKE), "--n-trials", "-1"], "Invalid value for '--n-trials'"),
    (["study", "run", str(SMOKE), "--tracking-uri", "http://127.0.0.1:1"], "unreachable"),
    (["study", "status", "--name", "nope"], "optuna.db: no such database"),
    (["study", "check", "--name", "nope"], "optuna.db: no such database"),
    (["best", "--name", "nope"], "optuna.db: no such database"),
    (["study", "list"], "optuna.db: no such database"),
])
def test_bad_cli_input_exit_2_and_create_nothing(capsys: pytest.CaptureFixture, tmp_path: Path, args: list[str],
                                                 message: str) -> None:
    code, _, err = cli(capsys, *args)
    one_line_error(code, err, message)
    assert "secret" not in err  # passwords are masked
    assert not (tmp_path / "mlflow.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # read-only commands make no database, nor a lock


def test_a_space_that_hardly_holds_a_valid_network_stops_in_one_line(capsys: pytest.CaptureFixture,
                                                                      tmp_path: Path, data_dir: Path, mlflow_db: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused configurations do not count toward n_trials: a range of paddings almost all invalid was once
    sampled without end. The worker stops after REFUSED_IN_A_ROW of them, trained nothing, and says why."""
    from mnistlab.search import progress

    monkeypatch.setattr(progress, "REFUSED_IN_A_ROW", 25)
    path = tmp_path / "wide.yaml"
    path.write_text(f"name: wide\nbase: {ROOT / 'experiments' / 'eva4-s4.yaml'}\nmax_params: 20000\n"
                    "n_trials: 2\nenqueue_base: false\nsampler: {name: random, seed: 0}\n"
                    "space:\n  model.paddings.0: {type: int, low: 0, high: 100000000000}\n")
    code, out, err = cli(capsys, "study", "run", str(path), "--data-dir", str(data_dir))
    one_line_error(code, err, "the last 25 configurations sampled were all refused before training")
    assert "model.paddings must be 0..64" in err and out.count("SKIPPED") == 25
    trials = load("wide", open_storage(None, heartbeat=None)).trials
    assert len(trials) == 25 and not any(t.user_attrs.get(tr.TRAINED) for t in trials)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_db)
    (parent,) = client.search_runs([client.get_experiment_by_name("wide").experiment_id])
    assert parent.info.status == "FAILED"  # the parent run is ended, not left RUNNING


BAD_NAMES = ["../../../x", "/tmp/x", "..", ".hidden", "", "a/b", "a'b", "a b", "x\ny", "é", "-x",
             "n" * 101, "n" * 256, "n" * 501]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:12]) + f"/{len(n)}")
def test_unsafe_study_names_are_refused_before_anything_is_created(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  name: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: {name!r}\nbase: {ROOT / 'experiments' / 'eva4-s4.yaml'}\nmax_params: 20000\n"
                    "n_trials: 1\nspace: {train.lr: {type: float, low: 0.01, high: 0.1}}\n"
                    "overrides: {train.epochs: 1, data.limit_train: 200, data.limit_eval: 100}\n")
    for command in ("run", "create"):
        code, _, err = cli(capsys, "study", command, str(path))
        assert code == 2 and err.startswith("error: ") and "study name" in err, err
        assert len(err.strip().splitlines()) == 1
    for command in (["study", "status"], ["study", "check"], ["study", "report"], ["best"]):
        code, _, err = cli(capsys, *command, "--name", name)
        assert code == 2 and "study name" in err and "is not allowed" in err, err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no storage, store, lock or folder


def test_a_huge_or_odd_name_is_not_echoed_whole(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for value in ("x" * 1_000_000, "[" + ", ".join(["[1, 2, 3]"] * 5_000) + "]"):
        path = tmp_path / "s.yaml"
        path.write_text(f"name: {value}\nbase: x.yaml\nmax_params: 1\nspace: {{}}\n")
        code, _, err = cli(capsys, "study", "run", str(path))
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert len(err) < 600, len(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_safe_names_pass_and_an_unsafe_name_in_a_storage_is_shown_but_refused(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    for name in ("a", "Study_1.2-b", "9" * 100):
        assert check_name(name, "here") == name
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="../escape", storage=url)  # plain Optuna accepts any name
    optuna.create_study(study_name="fine", storage=url)
    code, out, _ = cli(capsys, "study", "list")
    assert code == 0 and "fine" in out and "'../escape' (unsafe name, refused)" in out, out
    with pytest.raises(UserError, match="study name '../escape' is not allowed"):
        load("../escape", open_storage(url, heartbeat=None))
    code, _, err = cli(capsys, "study", "report", "--name", "../escape")
    assert code == 2 and "is not allowed" in err
    assert not (tmp_path / "mnistlab-artifacts").exists() and not (tmp_path.parent / "escape").exists()


def test_an_artifacts_folder_that_cannot_be_written_is_refused_before_the_study_exists(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("not a folder")
    code, _, err = cli(capsys, "study", "run", str(SMOKE), "--artifacts", "afile/sub", *FAST)
    assert code == 2 and "--artifacts" in err and "is not a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def trained_numbers(s: optuna.Study) -> list[int]:
    return [t.number for t in s.get_trials() if tr.trained(t)]


@pytest.mark.slow
@pytest.mark.usefixtures("data_dir")
def test_a_real_study_completes_and_resumes(tmp_path: Path) -> None:
    proc = run_cli("study", "run", str(SMOKE), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "trained 3/3" in proc.stdout
    storage = open_storage(None, heartbeat=None)
    s = load("smoke", storage)
    assert len(trained_numbers(s)) == 3
    assert s.trials[0].params["model.widths.1"] == 32 and s.trials[0].user_attrs["base"]  # the yardstick
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in s.trials)
    # The same command again continues the same study: it is already complete.
    again = run_cli("study", "run", str(SMOKE), *FAST)
    assert again.returncode == 0 and "already has 3 trained trials" in again.stdout
    assert len(load("smoke", storage).trials) == len(s.trials)
    more = run_cli("study", "run", str(SMOKE), *FAST, "--n-trials", "5")
    assert more.returncode == 0, more.stderr
    assert len(trained_numbers(load("smoke", storage))) == 5
    status = run_cli("study", "status", str(SMOKE), "--csv", "trials.csv")
    assert status.returncode == 0 and "param_count" in status.stdout
    rows = (tmp_path / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(load("smoke", storage).trials)
    listing = run_cli("study", "list")
    assert "smoke" in listing.stdout
    # The storage stays a plain Optuna storage: Optuna's own CLI reads it.
    optuna_cli = run_cli_optuna("studies", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert "smoke" in optuna_cli


def run_cli_optuna(*args: str) -> str:
    """Optuna's own `optuna` command, installed beside this Python."""
    import subprocess
    import sys

    return subprocess.run([str(Path(sys.executable).parent / "optuna"), *args], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow
@pytest.mark.usefixtures("data_dir")
def test_two_workers_on_postgresql_train_exactly_n_trials(pg_url: str) -> None:
    proc = run_cli("study", "run", str(SMOKE), *FAST, "--storage", pg_url, "--workers", "2", "--n-trials", "4")
    assert proc.returncode == 0, proc.stderr
    s = load("smoke", open_storage(pg_url, heartbeat=None))
    numbers = [t.number for t in s.trials]
    assert numbers == list(range(len(numbers)))  # no gaps, no duplicates
    assert len(trained_numbers(s)) == 4
    assert not [t for t in s.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
@pytest.mark.usefixtures("data_dir")
def test_a_continued_study_does_not_replay_its_seed(tmp_path: Path) -> None:
    """A seeded sampler restarted on the same study would suggest its first samples again."""
    path = study_file(tmp_path, """
max_params: 20000
sampler: {name: random, seed: 3}
pruner: none
enqueue_base: false
space:
  model.dropout: {type: float, low: 0.0, high: 0.15}
  model.widths.1: {type: int, low: 8, high: 48, step: 4}
""")
    fast = ["--epochs", "1", "--limit-train", "300", "--limit-eval", "100", "--threads", "1"]
    assert run_cli("study", "run", str(path), *fast, "--n-trials", "2").returncode == 0
    more = run_cli("study", "run", str(path), *fast, "--n-trials", "4")
    assert more.returncode == 0, more.stderr
    s = load("s", open_storage(None, heartbeat=None))
    sampled = [tuple(sorted(t.params.items())) for t in s.trials]
    assert len(sampled) == 4 and len(set(sampled)) == 4, sampled


def test_a_study_folder_is_keyed_by_its_id_and_an_older_study_keeps_its_own(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'k.db'}", heartbeat=None)
    made = create(load_study(SMOKE), storage)
    uid = made.user_attrs[ID_ATTR]
    assert len(uid) == 32 and runner.study_folder(made) == f"smoke-{uid[:8]}"
    assert create(load_study(SMOKE), storage).user_attrs[ID_ATTR] == uid  # set once
    older = optuna.create_study(storage=storage, study_name="older")  # as made before study ids
    assert runner.study_folder(older) == "older"


@pytest.mark.slow
@pytest.mark.usefixtures("data_dir")
def test_same_named_studies_in_two_storages_keep_their_own_checkpoints_and_runs(tmp_path: Path,
                                                                                mlflow_db: str) -> None:
    tiny = ["--epochs", "1", "--limit-train", "300", "--limit-eval", "100", "--threads", "1", "--n-trials", "1"]
    first, second = (f"sqlite:///{tmp_path / name}" for name in ("a.db", "b.db"))
    assert run_cli("study", "run", str(SMOKE), *tiny, "--storage", first).returncode == 0
    a = load("smoke", open_storage(first, heartbeat=None)).trials[0]
    last = Path(a.user_attrs["checkpoint_dir"]) / "last.pt"
    written = last.stat().st_mtime_ns
    taken = run_cli("study", "run", str(SMOKE), *tiny, "--storage", second)
    assert taken.returncode == 2, taken.stdout + taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1 and "another study named 'smoke'" in taken.stderr
    assert "a.db" in taken.stderr  # where that other study lives
    assert not (tmp_path / "b.db").exists() and not (tmp_path / "b.db.lock").exists()  # nothing created
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_db)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len([r for r in runs if r.data.tags.get("mnistlab.parent") == "true"]) == 1
    apart = run_cli("study", "run", str(SMOKE), *tiny, "--storage", second,
                    "--tracking-uri", f"sqlite:///{tmp_path / 'other.db'}")
    assert apart.returncode == 0, apart.stderr
    b = load("smoke", open_storage(second, heartbeat=None)).trials[0]
    assert Path(b.user_attrs["checkpoint_dir"]).parent != last.parent.parent
    assert last.stat().st_mtime_ns == written  # the first study's checkpoints untouched
    assert run_cli("study", "check", "--name", "smoke", "--storage", first).returncode == 0


def test_a_query_password_is_masked_in_the_banner_and_in_mlflow(capsys: pytest.CaptureFixture, pg_url: str,
                                                                 mlflow_db: str) -> None:
    secret = "QueryS3cret"
    storage = f"{pg_url}?password={secret}"  # trust auth accepts any password
    code, out, err = cli(capsys, "study", "create", str(SMOKE), "--storage", storage)
    assert code == 0, err
    assert secret not in out + err and "password=***" in out
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_db)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    recorded = [*experiment.tags.values(), *(v for r in runs for v in [*r.data.params.values(),
                                                                          *r.data.tags.values()])]
    assert recorded and not [v for v in recorded if secret in v]
    assert any("password=***" in v for v in recorded)  # study.storage, masked
    assert secret not in str(load("smoke", open_storage(storage, heartbeat=None)).user_attrs)


def test_workers_get_the_storage_and_tracking_uri_through_the_environment(tmp_path: Path) -> None:
    storage, tracking = "postgresql://u:WorkerS3cret@db/optuna", "postgresql://u:WorkerS3cret@db/mlflow"
    opts = runner.RunOptions(storage=storage, tracking_uri=tracking, workers=2, artifacts=tmp_path)
    args = runner.worker_args(load_study(SMOKE), opts, threads=1, index=1)
    assert not [a for a in args if "WorkerS3cret" in a or a in ("--storage", "--tracking-uri")]
    assert args[args.index("--worker-index") + 1] == "1"  # who it is travels in its arguments
    env = runner.worker_env(opts)
    assert env["MNISTLAB_STORAGE"] == storage and env["MLFLOW_TRACKING_URI"] == tracking


def test_one_rule_resolves_the_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the URI the study recorded (unless masked), else mlflow.db."""
    from mnistlab.tracking.uri import resolve_uri

    flag, env, recorded = "http://flag:5000", "http://env:5000", "http://recorded:5000"
    assert resolve_uri(flag, recorded) == flag
    assert resolve_uri(None, recorded) == recorded
    assert resolve_uri(None, "http://u:***@recorded:5000") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert resolve_uri(None, recorded) == env and resolve_uri(flag, recorded) == flag


def test_a_worker_is_told_its_index_not_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a worker of `--workers N` past the first (or any, with MNISTLAB_SEED_PER_WORKER=1) mixes a salt
    into the sampler's seed on a fresh study."""
    monkeypatch.setenv("MNISTLAB_WORKER", "3")  # the variable that once said so is read no more
    monkeypatch.delenv("MNISTLAB_SEED_PER_WORKER", raising=False)
    assert worker_salt([]) is None and worker_salt([], 0) is None
    assert worker_salt([], 2).startswith("2:")
    monkeypatch.setenv("MNISTLAB_SEED_PER_WORKER", "1")
    assert worker_salt([]).startswith("None:")


def test_more_workers_than_the_machine_holds_are_refused_before_anything_starts(capsys: pytest.CaptureFixture,
                                                                               tmp_path: Path) -> None:
    import os

    too_many = len(os.sched_getaffinity(0)) + 1
    code, _, err = cli(capsys, "study", "run", str(SMOKE), "--workers", str(too_many), "--device", "cpu")
    one_line_error(code, err, f"--workers {too_many}: this machine has {too_many - 1} CPU cores")
    assert "--oversubscribe" in err and "MNISTLAB_OVERSUBSCRIBE=1" in err
    code, _, err = cli(capsys, "study", "run", str(SMOKE), "--workers", "100000")
    one_line_error(code, err, "--workers 100000:")
    assert list(tmp_path.iterdir()) == []  # no storage, no MLflow store, no process started
    runner.check_workers(runner.RunOptions(workers=100000, oversubscribe=True))  # the override
    runner.check_workers(runner.RunOptions(workers=1))


@pytest.mark.slow
def test_diverged_trials_fail_with_their_reason_and_the_study_ends(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                     data_dir: Path, mlflow_db: str) -> None:
    path = study_file(tmp_path, """
max_params: 20000
n_trials: 2
enqueue_base: false
overrides: {train.lr: 1.0e+30}
space: {model.dropout: {type: float, low: 0.0, high: 0.1}}
""")
    code, out, err = cli(capsys, "study", "run", str(path), "--epochs", "1", "--limit-train", "300",
                         "--limit-eval", "100", "--threads", "1")
    assert code == 0, err
    s = load("s", open_storage(None, heartbeat=None))
    assert [t.state for t in s.trials] == [TrialState.FAIL, TrialState.FAIL]  # not COMPLETE with NaN
    assert all(t.user_attrs["reason"].startswith("Diverged: training diverged at epoch 1") for t in s.trials)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_db)
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED"]  # two trials, the parent
    assert cli(capsys, "study", "check", str(path))[0] == 0


@pytest.mark.slow
@pytest.mark.usefixtures("data_dir")
def test_study_report_attaches_its_plots_in_the_store_the_study_recorded(tmp_path: Path) -> None:
    """`study report` without --tracking-uri finds the study's own MLflow store (as `check` and
    `best` do): the plots go to its parent run, no default store is made in the working folder."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    (tmp_path / "elsewhere").mkdir()
    ran = run_cli("study", "run", str(SMOKE), "--n-trials", "3", "--epochs", "1", "--limit-train", "300",
                  "--limit-eval", "100", "--tracking-uri", store)
    assert ran.returncode == 0, ran.stderr
    reported = run_cli("study", "report", "--name", "smoke")
    assert reported.returncode == 0, reported.stderr
    assert not (tmp_path / "mlflow.db").exists()
    parent = load("smoke", open_storage(None, heartbeat=None)).user_attrs["mlflow_parent_run_id"]
    plots = {Path(a.path).name for a in MlflowClient(store).list_artifacts(parent, "plots")}
    assert "optimization_history.png" in plots, plots
    typo = run_cli("study", "report", "--name", "smoke", "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}")
    assert typo.returncode == 2 and "no MLflow store at" in typo.stderr, typo.stderr
    assert not (tmp_path / "typo.db").exists()  # a mistyped store is not made
