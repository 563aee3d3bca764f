#!/bin/sh
# The stack's first step (service "secrets"): refuse to start while a secret is empty or still
# holds its example value from .env.example ("change-me-..."), which anyone can read in the
# repository. Checks the variables it is given; docker-compose.auth.yml adds MLflow's.
set -u
bad=""
for name in POSTGRES_PASSWORD MLFLOW_TRACKING_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
    eval "given=\${$name+yes} value=\${$name:-}"
    [ "$given" = yes ] || continue
    lower=$(printf '%s' "$value" | tr 'A-Z' 'a-z')  # CHANGE-ME-... is the example too
    case "$lower" in
        "" | change-me* | changeme*) bad="$bad $name" ;;
    esac
done
if [ -n "$bad" ]; then
    echo "error:$bad: empty or still the example value from .env.example; set your own secrets in .env" >&2
    exit 1
fi
echo "secrets set"
