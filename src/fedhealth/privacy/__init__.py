"""Privacy: clipping and noise, DP-SGD helpers, accounting through Google's dp-accounting, noise calibration
from a target epsilon, and the per-dataset budget ledger (check, then commit).
"""

__all__: list[str] = []
