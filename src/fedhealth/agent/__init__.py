"""Site agent: the service next to a hospital's data. It dials out only, long-polls for tasks, trains locally
and uploads updates, retrying with backoff whenever the orchestrator is unreachable.
"""

from fedhealth.agent._agent import AgentSettings, SiteAgent, SiteRefused, run_agent
from fedhealth.agent._client import (
    OrchestratorClient,
    OrchestratorRefused,
    RetryPolicy,
    TlsVerificationError,
    connection_problem,
)
from fedhealth.agent._home import SiteHome, enroll_site

__all__ = [
    "AgentSettings",
    "OrchestratorClient",
    "OrchestratorRefused",
    "RetryPolicy",
    "SiteAgent",
    "SiteHome",
    "SiteRefused",
    "TlsVerificationError",
    "connection_problem",
    "enroll_site",
    "run_agent",
]
