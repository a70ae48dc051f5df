"""Site agent: the service next to a hospital's data. It dials out only, long-polls for tasks, trains locally
and uploads updates.
"""

__all__: list[str] = []
