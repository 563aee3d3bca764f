"""Delivery, the ``best`` and ``evaluate`` commands: the pick, refits, the verified weights, the export formats,
the model card.
"""
