"""The MLflow adapter: the tracker and its client, what a training logs, the registry, URIs, the UI server.

The only package that imports mlflow. It imports the trainer core and ``mnistlab.util``, never Optuna or the search.
"""
