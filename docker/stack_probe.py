"""What docker/try-stack.sh asks of a running stack, asked from inside it.

Runs in a container of the stack's image with the worker service's environment (the storage URL
and the MLflow server by their service names), so that every answer comes through the stack's own
network and MLflow's proxied artifact store, never through a shared folder:

    python docker/stack_probe.py busy STUDY SECONDS   # hosts training a trial past its first epoch
    python docker/stack_probe.py report STUDY KILLED  # JSON summary; exit 1 on any broken promise

KILLED is the hostname of the worker container the script killed mid-trial ("-" if none).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

PARENT_ATTR = "mlflow_parent_run_id"  # mnistlab/search/runner.py
WORKER, RUN_ID, RETRY_OF = "worker", "mlflow_run_id", "retry_of_trial"  # mnistlab/core/trials.py


def _study(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=os.environ["MNISTLAB_STORAGE"])


def _host(trial: optuna.trial.FrozenTrial) -> str:
    return str(trial.user_attrs.get(WORKER, "")).split("|")[0]


def _retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The trial this one retries: a stale heartbeat's retry (Optuna's callback) or an interrupted one's."""
    if RETRY_OF in trial.user_attrs:
        return int(trial.user_attrs[RETRY_OF])
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryFailedTrialCallback.retried_trial_number(trial)


def busy(name: str, seconds: float) -> int:
    """Print the hostnames training a trial that has logged at least one epoch; wait for one."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        hosts = sorted({_host(t) for t in _study(name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                        if t.intermediate_values and _host(t)})
        if hosts:
            print("\n".join(hosts))
            return 0
        time.sleep(1)
    print(f"error: no trial of study {name!r} trained past its first epoch within {seconds:.0f} s", file=sys.stderr)
    return 1


def report(name: str, killed: str) -> int:
    study = _study(name)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    problems = []
    unfinished = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if unfinished:
        problems.append(f"trials still running or waiting: {unfinished}")
    killed_trials = [t.number for t in trials if killed != "-" and _host(t) == killed]
    retries = [{"trial": t.number, "retry_of": _retry_of(t), "host": _host(t), "state": t.state.name}
               for t in trials if _retry_of(t) is not None]
    if killed != "-":
        if not killed_trials:
            problems.append(f"no trial ran on the killed worker {killed}")
        elif not any(r["retry_of"] in killed_trials and r["host"] != killed and r["state"] != "FAIL" for r in retries):
            problems.append(f"no other worker finished a retry of the killed worker's trials {killed_trials}")

    client = MlflowClient()
    parent = study.user_attrs.get(PARENT_ATTR)
    runs: dict[str, dict] = {}
    if not parent:
        problems.append("the study has no MLflow parent run")
    else:
        run = client.get_run(parent)
        children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                                      max_results=1000)
        for child in children:
            ckpts = [a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")]
            runs[child.info.run_id] = {"status": child.info.status, "checkpoints": len(ckpts)}
        for t in trials:
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            run_id = t.user_attrs.get(RUN_ID)
            if run_id not in runs:
                problems.append(f"trial {t.number} has no child run under the parent run")
            elif not runs[run_id]["checkpoints"]:
                problems.append(f"trial {t.number}'s run {run_id} holds no checkpoint")
    print(json.dumps({"study": name, "trials": len(trials), "states": states, "killed_worker": killed,
                      "killed_worker_trials": killed_trials, "retries": retries, "parent_run": parent,
                      "child_runs": len(runs),
                      "runs_with_checkpoints": sum(1 for r in runs.values() if r["checkpoints"]),
                      "problems": problems}, indent=1))
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "busy":
        return busy(argv[1], float(argv[2]))
    if len(argv) == 3 and argv[0] == "report":
        return report(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
