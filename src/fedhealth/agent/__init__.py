"""Site agent: the service next to a hospital's data. It dials out only, long-polls for tasks, trains locally
and uploads updates, retrying with backoff whenever the orchestrator is unreachable.
"""

from fedhealth.agent._agent import AgentSettings, SiteAgent, run_agent
from fedhealth.agent._client import OrchestratorClient, OrchestratorRefused, RetryPolicy

__all__ = [
    "AgentSettings",
    "OrchestratorClient",
    "OrchestratorRefused",
    "RetryPolicy",
    "SiteAgent",
    "run_agent",
]
