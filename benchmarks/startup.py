"""Start-up of the commands that only read records: `study check`, `best` (the pick alone) and
`study status` on a small trained study, timed as a user runs them (a fresh process each time).

    python benchmarks/startup.py                       # this checkout
    python benchmarks/startup.py --against /tmp/old    # and another checkout of mnistlab, interleaved

With ``--against``, each command runs alternately from the two checkouts (``PYTHONPATH``), so
both see the same machine; the medians and their ratio are printed, with whether torch was
imported. The study is made once, in a temporary folder, by this checkout (2 trials of 1 epoch on
300 images).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (("study", "check", "smoke"), ("best", "smoke"), ("study", "status", "smoke"))
PROBE = "import sys, runpy; sys.argv = ['mnistlab', *sys.argv[1:]]\ntry:\n    runpy.run_module('mnistlab', " \
        "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)"


def run(tree: Path, args: tuple[str, ...], env: dict[str, str], cwd: Path) -> tuple[float, bool]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env, "PYTHONPATH": str(tree)})
    took = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"{tree}: mnistlab {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return took, proc.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another mnistlab checkout to time alongside")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    if not 1 <= opts.repeats <= 100:
        parser.error(f"--repeats {opts.repeats}: expected 1 to 100")
    if opts.against is not None and not (opts.against / "mnistlab" / "__init__.py").is_file():
        parser.error(f"--against {opts.against}: not a checkout of mnistlab (no mnistlab/__init__.py)")
    trees = {"this": ROOT} | ({"against": opts.against.resolve()} if opts.against else {})
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        env = {"MNISTLAB_STORAGE": f"sqlite:///{cwd / 'optuna.db'}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
        small = ["--n-trials", "2", "--epochs", "1", "--limit-train", "300", "--limit-eval", "100", "--threads", "1"]
        made = subprocess.run([sys.executable, "-m", "mnistlab", "study", "run", "smoke", *small], capture_output=True,
                              text=True, cwd=cwd, env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
        if made.returncode != 0:
            sys.exit(f"the study could not be made: {made.stderr.strip()[-300:]}")
        print(f"{'command':<22} " + " ".join(f"{name + ' median s':>18} {'torch':>6}" for name in trees)
              + ("   ratio" if opts.against else ""))
        for args in COMMANDS:
            times: dict[str, list[float]] = {name: [] for name in trees}
            torch: dict[str, bool] = {}
            for _ in range(opts.repeats):
                for name, tree in trees.items():
                    took, torch[name] = run(tree, args, env, cwd)
                    times[name].append(took)
            medians = {name: statistics.median(t) for name, t in times.items()}
            line = f"{' '.join(args):<22} " + " ".join(f"{medians[n]:>18.2f} {str(torch[n]):>6}" for n in trees)
            if opts.against:
                line += f"   {medians['this'] / medians['against']:.2f}"
            print(line)


if __name__ == "__main__":
    main()
