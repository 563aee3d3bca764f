#!/usr/bin/env bash
# Builds the mnistlab image from a clean checkout and runs the compose stack on this machine, in
# containers, end to end; prints the timings and the image size. docs/scale-out.md explains it.
#
#   docker/try-stack.sh                 # build and run; remove the stack and its volumes at the end
#   docker/try-stack.sh --keep          # leave the stack up (its ports and .env are printed)
#   docker/try-stack.sh --working-tree  # build from the working tree's files, not the last commit
#   docker/try-stack.sh --no-cache      # build every layer anew (the build time docs/scale-out.md gives)
#
# Docker with "docker compose" where present; otherwise podman, whose Docker-compatible API serves
# Debian's docker-compose. Where python:3.11-slim and postgres:16 cannot be pulled, local stand-ins
# are built from Debian's archive (docker/standin/); where the PyTorch wheel index cannot be
# reached, torch comes from a wheel index served on 127.0.0.1 from this machine's pip. None of
# that touches docker-compose.yml: the stack runs as a Docker user's would.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${MNISTLAB_TRY_WORK:-/var/tmp/mnistlab-try-stack}
PROJECT=mnistlab-try
WORKERS=3
STUDY=try-stack
KEEP=0
FROM=commit
NO_CACHE=""
# torch for the image where its index cannot be reached: this machine's pip resolves the spec
TORCH_SPEC=${MNISTLAB_TRY_TORCH:-"torch==2.13.0+cpu torchvision==0.28.0"}

for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        --no-cache) NO_CACHE=--no-cache ;;
        --working-tree) FROM=tree ;;
        -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "try-stack: error: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

T0=$(date +%s)
say() { printf '[try-stack %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { printf 'try-stack: error: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not installed${2:+ ($2)}"; }
declare -A FIG  # the figures printed at the end
PIDS=()

cleanup() {
    local code=$?
    if [ "$code" != 0 ] && [ -n "${COMPOSE_READY:-}" ]; then
        compose logs --no-color >"$WORK/compose.log" 2>&1 || true
        echo "try-stack: the containers' logs are in $WORK/compose.log" >&2
    fi
    if [ "$KEEP" = 0 ] && [ -n "${COMPOSE_READY:-}" ]; then
        compose down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK"
chmod 700 "$WORK"

# --- the engine --------------------------------------------------------------------------------
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    ENGINE=docker
    compose() { (cd "$SRC" && docker compose -p "$PROJECT" "$@"); }
else
    need podman "neither Docker nor podman: apt-get install podman docker-compose"
    need docker-compose "podman's Docker API is driven by Compose: apt-get install docker-compose"
    ENGINE=podman
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/docker/podman/containers.conf}
    SOCK="$WORK/podman.sock"
    rm -f "$SOCK"
    podman system service --time=0 "unix://$SOCK" >"$WORK/podman-service.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.2; done
    [ -S "$SOCK" ] || die "podman's API socket did not open (see $WORK/podman-service.log)"
    export DOCKER_HOST="unix://$SOCK"
    compose() { (cd "$SRC" && docker-compose -p "$PROJECT" "$@"); }
fi
eng() { "$ENGINE" "$@"; }
say "engine: $ENGINE ($(eng --version | head -1))"

# --- base images -------------------------------------------------------------------------------
have_image() { eng image inspect "$1" >/dev/null 2>&1; }
STANDIN=0
for image in python:3.11-slim postgres:16; do
    if have_image "$image" || timeout 60 "$ENGINE" pull -q "docker.io/library/$image" >/dev/null 2>&1; then
        continue
    fi
    STANDIN=1
done
if [ "$STANDIN" = 1 ]; then
    say "python:3.11-slim or postgres:16 cannot be pulled: building local stand-ins from Debian's archive"
    need debootstrap "apt-get install debootstrap"
    t=$(date +%s)
    base=localhost/mnistlab-standin/debian:bookworm
    if ! have_image "$base"; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
            || die "debootstrap failed (see $WORK/debootstrap.log)"
        tar -C "$WORK/rootfs" -c . | eng import - "$base" >/dev/null 2>&1
        rm -rf "$WORK/rootfs"
    fi
    for name in python postgres; do
        ctx="$WORK/standin-$name"
        rm -rf "$ctx" && mkdir -p "$ctx/ca"
        cp "$ROOT/docker/standin/$name.Containerfile" "$ctx/Containerfile"
        cp "$ROOT/docker/standin/postgres-entrypoint.sh" "$ctx/"
        cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true  # an inspecting egress proxy's CA
        tag=python:3.11-slim; [ "$name" = postgres ] && tag=postgres:16
        eng build -q --network host -t "localhost/$tag" "$ctx" >"$WORK/standin-$name.log" 2>&1 \
            || die "the $name stand-in did not build (see $WORK/standin-$name.log)"
    done
    FIG[stand-ins]="$(($(date +%s) - t)) s"
fi

# --- a clean checkout --------------------------------------------------------------------------
SRC="$WORK/src"
rm -rf "$SRC" && mkdir -p "$SRC"
if [ "$FROM" = commit ]; then
    git -C "$ROOT" archive HEAD | tar -C "$SRC" -xf -
    FIG[source]="commit $(git -C "$ROOT" rev-parse --short HEAD)"
else
    (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -C "$SRC" -xf -
    FIG[source]="working tree of $(git -C "$ROOT" rev-parse --short HEAD)"
fi
say "source: ${FIG[source]}"

# --- the image ---------------------------------------------------------------------------------
BUILD_ARGS=()
if ! curl -sf --max-time 10 -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then
    say "the PyTorch wheel index cannot be reached: serving '$TORCH_SPEC' from a local index"
    wheels="$WORK/torch-index"
    mkdir -p "$wheels/wheels"
    # shellcheck disable=SC2086  # the spec is a list of requirements
    python3 -m pip download -q --only-binary :all: -d "$wheels/wheels" $TORCH_SPEC >"$WORK/pip-download.log" 2>&1 \
        || die "pip could not download $TORCH_SPEC (see $WORK/pip-download.log)"
    python3 - "$wheels" <<'EOF'
import hashlib, pathlib, re, shutil, sys
root = pathlib.Path(sys.argv[1]); simple = root / "simple"
shutil.rmtree(simple, ignore_errors=True)
for whl in sorted((root / "wheels").glob("*.whl")):
    folder = simple / re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    folder.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    with open(folder / "index.html", "a") as page:
        page.write(f'<a href="../../wheels/{whl.name}#sha256={sha}">{whl.name}</a>\n')
EOF
    # one port from run to run where it is free, so that the image's torch layer stays cached
    port=$(python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", 18765))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$wheels" >"$WORK/torch-index.log" 2>&1 &
    PIDS+=($!)
    BUILD_ARGS+=(--network host --build-arg "TORCH_INDEX=http://127.0.0.1:$port/simple"
                 --build-arg "TORCH_EXTRA_INDEX=http://127.0.0.1:$port/simple")
fi
say "building mnistlab:latest"
t=$(date +%s)
eng build $NO_CACHE "${BUILD_ARGS[@]}" -t mnistlab:latest "$SRC" >"$WORK/build.log" 2>&1 || die "the image did not build (see $WORK/build.log)"
FIG[build]="$(($(date +%s) - t)) s"
size=$(eng image inspect -f '{{.Size}}' mnistlab:latest)
FIG[image size]="$((size / 1000000)) MB"
say "built in ${FIG[build]}, ${FIG[image size]}"

# --- settings: .env, and a smoke-sized study in the mounted studies/ ---------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
PG_PORT=$(free_port) ML_PORT=$(free_port) DASH_PORT=$(free_port)
sed -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$(secret)/" \
    -e "s/^MLFLOW_TRACKING_PASSWORD=.*/MLFLOW_TRACKING_PASSWORD=$(secret)/" \
    -e "s/^MLFLOW_FLASK_SERVER_SECRET_KEY=.*/MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret)/" \
    -e "s/^POSTGRES_PORT=.*/POSTGRES_PORT=$PG_PORT/" -e "s/^MLFLOW_PORT=.*/MLFLOW_PORT=$ML_PORT/" \
    -e "s/^DASHBOARD_PORT=.*/DASHBOARD_PORT=$DASH_PORT/" -e "s/^MNISTLAB_STUDY=.*/MNISTLAB_STUDY=$STUDY.yaml/" \
    -e "s/^MNISTLAB_THREADS=.*/MNISTLAB_THREADS=1/" -e "s/^MNISTLAB_HEARTBEAT=.*/MNISTLAB_HEARTBEAT=5/" \
    "$SRC/.env.example" >"$SRC/.env"
chmod 600 "$SRC/.env"
cat >"$SRC/studies/$STUDY.yaml" <<'EOF'
# docker/try-stack.sh's study: smoke-sized, long enough per trial to kill a worker in the middle.
name: try-stack
base: ../experiments/eva4-s4.yaml
overrides:
  train.epochs: 3
  train.batch_size: 64
  train.lr: 0.05
  data.limit_train: 3000
  data.limit_eval: 1000
max_params: 20000
objectives: [val_acc]
sampler: {name: tpe, seed: 1, n_startup_trials: 3}
pruner: {name: none}
n_trials: 8
enqueue_base: true
space:
  model.dropout: {type: float, low: 0.0, high: 0.15}
  train.lr: {type: float, low: 0.01, high: 0.2, log: true}
  model.widths.1: {type: int, low: 8, high: 48, step: 4}
EOF

# --- bad input first: the example passwords are refused ----------------------------------------
cp "$SRC/.env.example" "$WORK/example.env"
if out=$(cd "$SRC" && compose --env-file "$WORK/example.env" run --rm secrets 2>&1); then
    die "the secrets step accepted the example passwords of .env.example"
fi
grep -q "still the example value" <<<"$out" || die "the secrets step failed without saying why: $out"
say "secrets refuses .env.example's passwords: $(grep -o 'error:.*' <<<"$out" | head -1)"
: >"$WORK/empty.env"
if out=$(compose --env-file "$WORK/empty.env" config 2>&1 >/dev/null); then
    die "compose accepted a missing .env"
fi
say "a missing .env is refused: $(grep -o 'set POSTGRES_PASSWORD in .env' <<<"$out" | head -1)"
COMPOSE_READY=1

# a port already in use: compose stops with a line naming it, and nothing runs
held=$(free_port)
python3 -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); time.sleep(600)' "$held" &
PIDS+=($!)
sed "s/^POSTGRES_PORT=.*/POSTGRES_PORT=$held/" "$SRC/.env" >"$WORK/port-taken.env"
chmod 600 "$WORK/port-taken.env"
sleep 1
if out=$(compose --env-file "$WORK/port-taken.env" up -d --no-build 2>&1); then
    die "compose started the stack on a port already in use"
fi
running=$(eng ps -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
compose down >/dev/null 2>&1
[ "$running" = 0 ] || die "a port already in use left $running containers running"
say "a port in use stops the stack before it starts: $(grep -o '[^ ]*: bind: address already in use' <<<"$out" | head -1)"

# --- podman without systemd runs no healthcheck on its own: run them here ----------------------
if [ "$ENGINE" = podman ] && [ ! -d /run/systemd/system ]; then
    (
        while :; do
            for id in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT"); do
                podman healthcheck run "$id" >/dev/null 2>&1 || true
            done
            sleep 5  # the compose file's healthcheck interval: its retries count runs, not seconds
        done
    ) &
    PIDS+=($!)
fi

health() {  # the health status of one container
    eng inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1" 2>/dev/null || true
}
ids() { compose ps -q "$1" 2>/dev/null; }

# --- up ----------------------------------------------------------------------------------------
say "up: PostgreSQL, MLflow, the create step, $WORKERS workers, optuna-dashboard"
t=$(date +%s)
compose up -d --no-build --scale "worker=$WORKERS" >"$WORK/up.log" 2>&1 || die "compose up failed (see $WORK/up.log)"
for service in postgres mlflow; do
    id=$(ids "$service")
    for _ in $(seq 300); do [ "$(health "$id")" = healthy ] && break; sleep 1; done
    [ "$(health "$id")" = healthy ] || die "$service did not become healthy: $(health "$id")"
done
FIG[up to healthy]="$(($(date +%s) - t)) s"
create=$(compose ps -a -q create)
[ "$(eng inspect -f '{{.State.ExitCode}}' "$create")" = 0 ] || die "the create step failed: $(eng logs "$create" 2>&1 | tail -3)"
say "healthy after ${FIG[up to healthy]}; the study exists"

# One-off containers on the stack's network with a worker's settings. Not `compose run`: podman's
# Docker API refuses the links Compose v1 gives a one-off container. The password reaches the
# container through the environment (`-e NAME`), never through an argument.
NET=$(eng inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$(ids postgres)" | awk '{print $1}')
POSTGRES_PASSWORD=$(sed -n 's/^POSTGRES_PASSWORD=//p' "$SRC/.env")
export MNISTLAB_STORAGE="postgresql://mnistlab:$POSTGRES_PASSWORD@postgres:5432/optuna"
export MLFLOW_TRACKING_URI=http://mlflow:5000
in_stack() {
    eng run --rm --network "$NET" -e MNISTLAB_STORAGE -e MLFLOW_TRACKING_URI -e MNISTLAB_DATA_DIR=/opt/mnistlab/data \
        -v "$SRC/studies:/app/studies:ro" -v "$SRC/experiments:/app/experiments:ro" "$@"
}
probe() { in_stack --entrypoint python mnistlab:latest /app/docker/stack_probe.py "$@"; }

# --- kill one worker in the middle of a trial --------------------------------------------------
t=$(date +%s)
busy=$(probe busy "$STUDY" 300 | head -1) || die "no worker got past a trial's first epoch"
killed=""
for id in $(ids worker); do
    if [ "$(eng inspect -f '{{.Config.Hostname}}' "$id")" = "$busy" ]; then killed=$id; fi
done
[ -n "$killed" ] || die "no worker container has hostname $busy"
eng kill -s KILL "$killed" >/dev/null
eng rm -f "$killed" >/dev/null  # gone for good: another worker must take the retry
say "killed worker $busy in the middle of a trial"

# --- the study runs to its end ------------------------------------------------------------------
for id in $(ids worker); do
    timeout 1800 "$ENGINE" wait "$id" >/dev/null || die "worker $id did not finish"
done
FIG[study]="$(($(date +%s) - t)) s"
probe report "$STUDY" "$busy" >"$WORK/report.json" || { cat "$WORK/report.json"; die "the stack broke a promise"; }
say "study done in ${FIG[study]}: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["states"], "retries", [(x["trial"], x["retry_of"]) for x in r["retries"]], r["child_runs"], "child runs,", r["runs_with_checkpoints"], "with checkpoints")' "$WORK/report.json")"

resumed=$(compose logs --no-color worker 2>/dev/null | grep -o 'checkpoint of run [0-9a-f]*: .*' | head -1)
[ -n "$resumed" ] || die "no worker resumed the killed worker's trial from its checkpoint in MLflow"
say "the retry resumed: $resumed"
waited=$(compose logs --no-color worker 2>/dev/null | grep -c 'waiting for trial' || true)
say "workers that found the study full and stayed for another worker's trial: $waited"

in_stack mnistlab:latest study check "studies/$STUDY.yaml" >"$WORK/check.log" 2>&1 \
    || { tail -5 "$WORK/check.log"; die "mnistlab study check failed in a container"; }
say "study check passes: $(tail -1 "$WORK/check.log")"
code=$(curl -s -o /dev/null -w '%{http_code}' -L "http://127.0.0.1:$DASH_PORT/")
[ "$code" = 200 ] || die "optuna-dashboard answered $code on port $DASH_PORT"
say "optuna-dashboard answers on 127.0.0.1:$DASH_PORT"

# --- down, then up: the volumes keep every record ----------------------------------------------
compose down >/dev/null 2>&1
t=$(date +%s)
compose up -d --no-build --scale worker=1 >>"$WORK/up.log" 2>&1 || die "compose up after down failed (see $WORK/up.log)"
for id in $(ids worker); do timeout 600 "$ENGINE" wait "$id" >/dev/null; done
FIG[down, up again]="$(($(date +%s) - t)) s"
probe report "$STUDY" "$busy" >"$WORK/report-after.json" || { cat "$WORK/report-after.json"; die "records broken after down/up"; }
python3 - "$WORK/report.json" "$WORK/report-after.json" <<'EOF' || die "down then up changed the records"
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:])
keys = ("trials", "states", "parent_run", "child_runs", "runs_with_checkpoints")
diff = [k for k in keys if before[k] != after[k]]
if diff:
    sys.exit(f"changed: {', '.join(diff)}")
EOF
in_stack mnistlab:latest study check "studies/$STUDY.yaml" >>"$WORK/check.log" 2>&1 \
    || die "mnistlab study check failed after down/up"
say "down, then up: every record kept, study check passes"

echo
echo "try-stack figures (engine $ENGINE, $(nproc) cores):"
for key in source stand-ins build "image size" "up to healthy" study "down, up again"; do
    [ -n "${FIG[$key]:-}" ] && printf '  %-15s %s\n' "$key" "${FIG[$key]}"
done
printf '  %-15s %s\n' total "$(($(date +%s) - T0)) s"
if [ "$KEEP" = 1 ]; then
    echo "the stack is up: MLflow http://127.0.0.1:$ML_PORT, dashboard http://127.0.0.1:$DASH_PORT (settings: $SRC/.env)"
    echo "stop it: (cd $SRC && ${ENGINE/podman/DOCKER_HOST=$DOCKER_HOST docker-compose} -p $PROJECT down -v)"
fi
