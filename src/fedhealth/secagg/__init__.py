"""Secure aggregation: SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017) as sans-IO state machines.

Client and server consume messages and return messages; no sockets, clock or database. Tests drive them in
memory; the agent and the orchestrator drive them over HTTPS.
"""

__all__: list[str] = []
