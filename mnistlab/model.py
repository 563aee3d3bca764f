"""An older import path, kept because model cards of exports made before the package split name it.

New code imports ``mnistlab.core.model``.
"""

from mnistlab.core.model import build_model, count_params, summary

__all__ = ["build_model", "count_params", "summary"]
