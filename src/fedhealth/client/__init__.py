"""Client: a typed Python client of the orchestrator's operator API (used by the CLI, the demo and tests).

It trusts only the federation's CA, trades the user's API key for short-lived operator tokens and renews
them as they expire.
"""

from fedhealth.client._operator import ClientError, OperatorClient

__all__ = ["ClientError", "OperatorClient"]
