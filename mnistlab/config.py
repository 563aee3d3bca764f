"""An older import path, kept because model cards of exports made before the package split name it.

New code imports ``mnistlab.core.config``.
"""

from mnistlab.core.config import from_dict

__all__ = ["from_dict"]
