"""The ground floor: files written all at once, bounded JSON, locks, waiting, signals, the user error.

Imports nothing else from mnistlab.
"""
