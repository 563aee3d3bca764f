"""The trainer core: configs, the layer plan, the model, MNIST, the trainer, checkpoints, trial records.

Knows nothing of Optuna or MLflow; imports only ``mnistlab.util`` from the rest of the package.
"""
