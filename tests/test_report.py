"""The study's plots: what `mnistlab study report` and the parent run's `plots/` hold."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from mnistlab.search import plots


def completed(tmp_path: Path, n: int) -> optuna.Study:
    """A single-objective study with ``n`` completed trials over one sampled parameter."""
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="r", direction="maximize")
    dist = optuna.distributions.FloatDistribution(0.001, 0.1, log=True)
    for i in range(n):
        lr = 0.001 * 2 ** i
        s.add_trial(optuna.trial.create_trial(
            params={"train.lr": lr}, distributions={"train.lr": dist}, value=90.0 + i,
            user_attrs={"best_val_acc": 90.0 + i, "param_count": 10_000, "trained": True}))
    return s


@pytest.mark.parametrize(("n", "drawn"), [(2, False), (3, True)])
def test_param_importances_need_three_completed_trials(tmp_path: Path, n: int, drawn: bool) -> None:
    """As the README says: the importances plot is drawn from 3 completed trials on, not before."""
    paths = plots.write(completed(tmp_path, n), ("val_acc",), tmp_path / "plots")
    names = {p.name for p in paths}
    assert {"optimization_history.png", "val_acc_vs_params.png"} <= names
    assert ("param_importances.png" in names) == drawn
