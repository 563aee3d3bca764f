"""The names mnistlab stores its records under, each spelled here once: a study's user
attributes in Optuna and the tags it puts on MLflow experiments and runs.

This module imports nothing from mnistlab, so every floor can read them, and a command that
only reads records (`study check`, `best`, `studies`) needs neither the trainer nor torch for
a name. A trial's own user attributes are core/trials.py's (they come with the rules that read
them). Renaming a value here orphans every record stored under the old one: add, never rename.
"""

# -- a study's user attributes (study.user_attrs) ---------------------------------------------
ID_ATTR = "mnistlab_study_id"  # a UUID set at creation: same-named studies in other storages stay apart
READY_ATTR = "mnistlab_ready"  # set last by the creating process: the study and its MLflow records exist
STARTED_ATTR = "mnistlab_started_at"  # Unix time of the study's creation: a stop's minutes count from it
STOP_ATTR = "mnistlab_stop"  # {"reason", "at", "host"} once the study is stopped
STUDY_FILE_ATTR = "study_file"  # the study file it was created from
MAX_PARAMS_ATTR = "max_params"  # the parameter budget
OBJECTIVES_ATTR = "objectives"  # the objective names, in order
PARENT_ATTR = "mlflow_parent_run_id"  # its one MLflow parent run
EXPERIMENT_ATTR = "mlflow_experiment_id"  # its MLflow experiment
TRACKING_ATTR = "mlflow_tracking_uri"  # the tracking URI it logs to, password masked

# -- tags on MLflow experiments and runs ---------------------------------------------------------
PARENT_TAG = "mnistlab.parent"  # "true" on a study's parent run
STUDY_TAG = "mnistlab.study"  # the study's name, on its parent and child runs
TRIAL_TAG = "mnistlab.trial"  # the trial's number, on a child run (and on a refit's test evaluation)
STUDY_ID_TAG = "mnistlab.study_id"  # on a study's experiment, parent and child runs: which study of that name
STORAGE_TAG = "mnistlab.storage"  # on a study's experiment: its storage, password masked
COLUMNS_TAG = "mnistlab.columns"  # on a study's experiment: the runs table's columns in `mnistlab ui`
RUN_KIND_TAG = "mnistlab.kind"  # on a `mnistlab train` run: "train"
OUTPUT_TAG = "mnistlab.output"  # on a `mnistlab train` run: its output folder
# how a run ended
EPOCHS_RUN_TAG = "mnistlab.epochs_run"
PRUNED_AT_TAG = "mnistlab.pruned_at_epoch"
INTERRUPTED_TAG = "mnistlab.interrupted"  # the signal (or "its process died") that ended it KILLED
FAIL_REASON_TAG = "mnistlab.fail_reason"  # why it ended FAILED
MISSING_ARTIFACTS_TAG = "mnistlab.missing_artifacts"  # checkpoint files its end could not send
BACKFILLED_TAG = "mnistlab.backfilled"  # "true": made by `study check --repair` from a local checkpoint
# what a run is to the study
RETRY_OF_RUN_TAG = "mnistlab.retry_of_run"  # the run(s) of the attempt(s) it resumes
RUNG_TAG = "mnistlab.rung"  # "screen-K" or "full" in a screened study
PROMOTED_FROM_TAG = "mnistlab.promoted_from"  # the screened trial it promotes
REPEAT_OF_TAG = "mnistlab.repeat_of"  # a seed repeat: the trial it repeats
SEED_TAG = "mnistlab.seed"  # the train.seed of a seed repeat or a refit
REFIT_TAG = "mnistlab.refit"  # "true" on a refit run
REFIT_OF_TAG = "mnistlab.refit_of_trial"  # the trial a refit trains again
RANK_TAG = "mnistlab.rank"  # a finished child run's rank in its study
# on the parent run
BEST_TRIAL_TAG = "mnistlab.best_trial"
BEST_RUN_TAG = "mnistlab.best_run"
TIED_TAG = "mnistlab.tied_with_best"
STOPPED_AT_TAG = "mnistlab.stopped_at"
STOP_REASON_TAG = "mnistlab.stop_reason"
