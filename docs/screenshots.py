"""The MLflow UI as a user meets it: `mnistlab ui` over a store, pages rendered by headless Chromium.

Starts `mnistlab ui` on a free loopback port and opens, in Debian's `chromium --headless`, a study's
experiment page, the runs link `mnistlab ui` prints for it, its parent run and one trial's metric charts;
saves a screenshot of each (small PNGs) and checks the rendered pages: the plain experiment address (where a
click in MLflow's list goes) and the study's link must open the runs table listing every trial, not MLflow's
GenAI overview, and the trial's charts must start with val_acc and the losses. Exit code 1 names what is
wrong.

    python docs/screenshots.py --tracking-uri sqlite:///mlflow.db --study smoke --out docs/img
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient
from PIL import Image

WINDOW = "1280,800"
TALL = "1280,1200"
ATTEMPTS = 6
RENDER_MS = 40_000  # virtual time for the UI's JavaScript to fetch and draw (charts load last), not wall time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, study: str, port: int) -> tuple[subprocess.Popen, str]:
    """`mnistlab ui`, up and answering; returns it and the runs link it printed for ``study``."""
    ui = subprocess.Popen([sys.executable, "-m", "mnistlab", "ui", "--port", str(port), "--tracking-uri", uri],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    link = None
    for line in ui.stdout:
        if line.strip().startswith(f"{study}: http"):
            link = line.split(": ", 1)[1].strip()
        if line.startswith("Registry store") or link:  # the links come before the server's own lines
            break
    if link is None:
        ui.kill()
        raise SystemExit(f"error: `mnistlab ui` printed no runs link for {study!r}")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return ui, link
        except OSError:
            time.sleep(0.5)
    ui.kill()
    raise SystemExit("error: the MLflow UI did not answer within 90 s")


def chromium(url: str, profile: Path, *mode: str, window: str = WINDOW) -> str:
    """One headless Chromium page load (a fresh profile: what a first visit shows); its stdout."""
    cmd = [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
           "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={window}",
           f"--virtual-time-budget={RENDER_MS}", *mode, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True).stdout


def page_text(dom: str) -> str:
    """The visible words of a dumped DOM."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def shoot(url: str, png: Path, work: Path, drawn: str | None = None) -> str:
    """Screenshot ``url`` into ``png`` (palette PNG, a few tens of KB) and return the page's text, both from one
    page load. The chart panes load last, lazily: with ``drawn`` (a word only a drawn chart shows) the page is
    loaded again, up to ATTEMPTS times, until the screenshot shows them; a warning says when it never did."""
    tall = png.name == "ui-trial-metrics.png"  # three rows of charts, the training curves among them
    for _ in range(ATTEMPTS if drawn else 1):
        text = page_text(chromium(url, Path(tempfile.mkdtemp(dir=work)), "--dump-dom", f"--screenshot={png}",
                                  window=TALL if tall else WINDOW))
        if drawn is None or drawn in text:
            break
    else:
        print(f"warning: {png.name}: the charts did not draw within {ATTEMPTS} page loads", file=sys.stderr)
    with Image.open(png) as img:
        img.convert("RGB").quantize(colors=128).save(png, optimize=True)
    return text


# The trial's charts: the score and the losses first, where MLflow alone sorts them by name (best_epoch first).
CHARTS = ["Model metrics (", "val_acc", "val_loss", "train_loss", "best_epoch"]


def in_order(text: str, words: list[str]) -> bool:
    """Whether, after the first word, each of the others first appears after the one before it."""
    _, found, rest = text.partition(words[0])
    at = [rest.find(w) for w in words[1:]]
    return bool(found) and -1 not in at and at == sorted(at)


def pages(client: MlflowClient, study: str, link: str) -> dict[str, tuple[str, list[str], list[str], str | None]]:
    """file name -> (url, words the rendered page must show, words it must show in this order once its
    chart cards rendered, a word its drawn charts show) for each page."""
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("mnistlab.parent") == "true")
    trials = sorted((r for r in runs if "mnistlab.trial" in r.data.tags), key=lambda r: r.info.run_name)
    if not trials:
        raise SystemExit(f"error: study {study!r} has no trial runs to show")
    names = [t.info.run_name for t in trials]
    root = link.split("/#/", 1)[0]
    base = f"{root}/#/experiments/{exp.experiment_id}/runs"
    mode = "?workflowType=machine_learning"  # MLflow's model-training side bar on the run pages too
    # The runs table's first columns, in a browser that never chose them: the score, its standard error,
    # the parameter count, the rank tag, then what the study searches (tracking/ui_plugin.py).
    searched = [c.split("`")[1] for c in json.loads(exp.tags.get("mnistlab.columns", "[]"))]
    columns = ["val_score", "val_se", "param_count", "mnistlab.rank", *searched]
    return {
        # Where a click on the experiment in MLflow's list goes, in a browser that never chose a view.
        "ui-experiment.png": (f"{root}/#/experiments/{exp.experiment_id}", ["Runs", *names, *columns], [], None),
        "ui-runs.png": (link, ["Runs", *names, *columns], [], None),
        "ui-parent-run.png": (f"{base}/{parent.info.run_id}{mode}", [parent.info.run_name, "Child runs"], [], None),
        # On a busy machine the charts may not draw within the render budget of any attempt: this page must
        # show its run and metrics section; its charts are retried (see shoot), and their order is checked
        # whenever their cards rendered.
        "ui-trial-metrics.png": (f"{base}/{trials[0].info.run_id}/model-metrics{mode}",
                                 [trials[0].info.run_name, CHARTS[0]], CHARTS,
                                 f"{trials[0].info.run_name} (train_loss)"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    p.add_argument("--study", default="smoke", help="the study (MLflow experiment) to show")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "img")
    args = p.parse_args(argv)
    if shutil.which("chromium") is None:
        print("error: Debian's chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ui, link = start_ui(args.tracking_uri, args.study, free_port())
    problems = []
    try:
        with tempfile.TemporaryDirectory(prefix="mnistlab-shots-") as work:
            for name, (url, wanted, order, drawn) in pages(MlflowClient(args.tracking_uri), args.study, link).items():
                text = shoot(url, args.out / name, Path(work), drawn)
                if order and not any(w in text for w in order[1:]):
                    # no chart card rendered in any page load (seen once on a loaded machine): nothing to order
                    print(f"warning: {name}: no chart rendered; their order is not checked", file=sys.stderr)
                    order = []
                missing = [w for w in wanted + order if w not in text]
                if order and not missing and not in_order(text, order):
                    missing = [f"{' < '.join(order)} in this order"]
                if missing or "Traces 0" in text:  # the GenAI overview of an experiment with no traces
                    problems.append(f"{name}: {url} shows {text[:300]!r}; missing {missing}")
                print(f"wrote {args.out / name} ({(args.out / name).stat().st_size // 1024} KB): {url}")
    finally:
        ui.terminate()
        ui.wait(30)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
