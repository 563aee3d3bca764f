"""Which trial score ranks networks best under noise: measured on real runs, test set for analysis only.

Trains a few configurations from the recorded studies with several seeds each on the usual
50,000 / 10,000 split and, after every epoch, measures validation and (for this analysis only,
never inside mnistlab) the test accuracy of that epoch's weights. Then it compares trial scores
a study could rank by:

- ``best_epoch``: the highest validation accuracy of any epoch (mnistlab's rule until now);
  the delivered weights are that epoch's.
- ``last_epoch``: the last epoch's validation accuracy; the delivered weights are the last.
- ``mean_last2`` / ``mean_last3``: the mean validation accuracy of the last two / three epochs;
  the delivered weights are the last epoch's.
- ``avg_last3``: the weights averaged over the last three epochs (BatchNorm statistics averaged
  too), scored on validation and delivered as such.

For each score it prints how far the score is from the delivered weights' test accuracy (bias,
RMSE), how well one seed's score orders the configurations by their seed-mean test accuracy
(Kendall's tau), how much test accuracy a pick by one seed's score loses against the best
configuration (regret), and the seed spread next to the binomial standard error.

    python benchmarks/selection.py [--seeds 3] [--epochs 8] [--threads 1] [--out selection.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mnistlab.core import checkpoint, data
from mnistlab.core.checkpoint_files import LAST
from mnistlab.core.config import from_dict
from mnistlab.core.model import build_model, count_params
from mnistlab.core.train import evaluate, train

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ["2026-11-29_under20k-2", "2026-11-29_under20k", "2026-11-29_smallest"]
RULES = ("best_epoch", "last_epoch", "mean_last2", "mean_last3", "avg_last3")


def configs(epochs: int) -> dict[str, dict[str, Any]]:
    """The recorded studies' picks and the reference recipe, on the 50k/10k split, ``epochs`` long."""
    out = {}
    for record in RECORDS:
        raw = json.loads((ROOT / "experiments" / record / "best" / "config.json").read_text())["config"]
        out[record.split("_", 1)[1]] = raw
    ref = from_dict(__import__("yaml").safe_load((ROOT / "experiments" / "eva4-s4-fast.yaml").read_text())).to_dict()
    out["eva4-s4-fast"] = ref
    for raw in out.values():
        raw["train"]["epochs"] = epochs
        raw["data"].update(full_train=False, limit_train=None, limit_eval=None)
    return out


def one_run(raw: dict[str, Any], seed: int, mnist: data.MnistData, threads: int) -> dict[str, Any]:
    """Per-epoch validation and test accuracy of one seed, plus the last-3 weight average."""
    raw = json.loads(json.dumps(raw))
    raw["train"].update(seed=seed, threads=threads)
    cfg = from_dict(raw)
    curve: list[dict[str, float]] = []
    kept: list[dict[str, torch.Tensor]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        net = build_model(cfg.model)

        def on_epoch(m: Any) -> None:
            state = checkpoint.load_state(folder / LAST)["model"]
            net.load_state_dict(state)
            kept.append(state)
            del kept[:-3]
            loss, correct = evaluate(net, mnist.test)
            curve.append({"epoch": m.epoch, "val_acc": m.val_acc, "test_acc": 100.0 * correct / len(mnist.test)})

        start = time.perf_counter()
        train(cfg, mnist, on_epoch, checkpoint_dir=folder, verbose=False)
        seconds = time.perf_counter() - start
    avg = {k: (sum(s[k].float() for s in kept) / len(kept)).to(kept[-1][k].dtype) for k in kept[-1]}
    net.load_state_dict(avg)
    _, val_correct = evaluate(net, mnist.val)
    _, test_correct = evaluate(net, mnist.test)
    return {"seed": seed, "params": count_params(cfg.model), "curve": curve, "seconds": round(seconds, 1),
            "avg_last3": {"val_acc": 100.0 * val_correct / len(mnist.val),
                          "test_acc": 100.0 * test_correct / len(mnist.test)}}


def scored(run: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(score on validation, test accuracy of the weights that score delivers) for each rule."""
    c = run["curve"]
    best = max(c, key=lambda e: (e["val_acc"], e["epoch"]))
    return {"best_epoch": (best["val_acc"], best["test_acc"]),
            "last_epoch": (c[-1]["val_acc"], c[-1]["test_acc"]),
            "mean_last2": (statistics.fmean(e["val_acc"] for e in c[-2:]), c[-1]["test_acc"]),
            "mean_last3": (statistics.fmean(e["val_acc"] for e in c[-3:]), c[-1]["test_acc"]),
            "avg_last3": (run["avg_last3"]["val_acc"], run["avg_last3"]["test_acc"])}


def kendall(a: list[float], b: list[float]) -> float:
    pairs = [(x1 - x2) * (y1 - y2) for (x1, y1), (x2, y2) in itertools.combinations(zip(a, b, strict=True), 2)]
    return sum((p > 0) - (p < 0) for p in pairs) / max(1, len(pairs))


def analyse(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    names = sorted(runs)
    n_seeds = min(len(v) for v in runs.values())
    runs = {k: v[:n_seeds] for k, v in runs.items()}
    out: dict[str, Any] = {}
    for rule in RULES:
        pairs = [scored(r)[rule] for name in names for r in runs[name]]
        diffs = [s - t for s, t in pairs]
        truth = {n: statistics.fmean(scored(r)[rule][1] for r in runs[n]) for n in names}
        taus, regrets = [], []
        for i in range(n_seeds):
            score = {n: scored(runs[n][i])[rule][0] for n in names}
            taus.append(kendall([score[n] for n in names], [truth[n] for n in names]))
            picked = max(names, key=lambda n: score[n])
            regrets.append(max(truth.values()) - truth[picked])
        out[rule] = {"bias": statistics.fmean(diffs), "rmse": math.sqrt(statistics.fmean(d * d for d in diffs)),
                     "kendall_tau": statistics.fmean(taus), "regret": statistics.fmean(regrets),
                     "mean_test": statistics.fmean(truth.values())}
    spread = {}
    for n in names:
        last = [r["curve"][-1]["val_acc"] for r in runs[n]]
        p = statistics.fmean(last) / 100
        spread[n] = {"seed_std_val": statistics.stdev(last) if len(last) > 1 else 0.0,
                     "binomial_se": 100 * math.sqrt(p * (1 - p) / data.SIZES["val"])}
    out["spread"] = spread
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training images (a dry run)")
    parser.add_argument("--out", type=Path, default=Path("selection.json"))
    parser.add_argument("--analyse-only", action="store_true", help="print the analysis of --out; train nothing")
    args = parser.parse_args()
    if args.seeds < 2 or args.epochs < 3 or args.threads < 1:
        parser.error("need --seeds >= 2, --epochs >= 3, --threads >= 1")
    torch.set_num_threads(args.threads)
    chosen = configs(args.epochs)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only}
    runs: dict[str, list[dict[str, Any]]] = json.loads(args.out.read_text())["runs"] if args.out.is_file() else {}
    loaded = {}
    if args.analyse_only:
        chosen = {}
    for name, raw in chosen.items():
        if args.limit_train:
            raw["data"]["limit_train"] = args.limit_train
        loaded[name] = data.load(from_dict(raw).data, "cpu")
    for seed in range(1, args.seeds + 1):  # seeds outermost: a partial run already compares every config
        for name, raw in chosen.items():
            if any(r["seed"] == seed for r in runs.get(name, [])):
                continue  # a rerun continues where the last one stopped
            run = one_run(raw, seed, loaded[name], args.threads)
            runs.setdefault(name, []).append(run)
            args.out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
            last = run["curve"][-1]
            print(f"{name:<14} seed {seed}  params {run['params']:>6,}  val {last['val_acc']:.2f}%  "
                  f"test {last['test_acc']:.2f}%  {run['seconds']:.0f} s", flush=True)
    complete = {k: v for k, v in runs.items() if len(v) >= 2}
    if len(complete) < 2:
        return
    result = analyse(complete)
    if not args.analyse_only:
        args.out.write_text(json.dumps({"runs": runs, "analysis": result}, indent=1) + "\n")
    print(f"\n{'score':<12} {'bias':>7} {'rmse':>7} {'tau':>6} {'regret':>7} {'test':>7}")
    for rule in RULES:
        r = result[rule]
        print(f"{rule:<12} {r['bias']:+7.3f} {r['rmse']:7.3f} {r['kendall_tau']:6.2f} {r['regret']:7.3f} "
              f"{r['mean_test']:7.2f}")
    for name, s in result["spread"].items():
        print(f"{name:<14} seed std of last-epoch val {s['seed_std_val']:.3f}%  binomial SE {s['binomial_se']:.3f}%")


if __name__ == "__main__":
    main()
