"""The Optuna side: study files, the objective, seed confirmation, storages, the study runner, its tables and plots.

Imports the trainer core, the MLflow adapter (``mnistlab.tracking``) and ``mnistlab.util``; nothing above.
"""
