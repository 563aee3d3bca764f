#!/bin/sh
# Runs once, when the postgres volume is new: MLflow's backend store gets its own database
# beside the Optuna storage (POSTGRES_DB).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"${MLFLOW_DB:-mlflow}\""
