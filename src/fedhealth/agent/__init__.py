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
from fedhealth.agent._gates import default_gates
from fedhealth.agent._home import SiteHome, enroll_site
from fedhealth.agent._pipeline import PassGate, SiteGate, TaskContext, TaskRefused
from fedhealth.agent._privacy import PrivacyGate

__all__ = [
    "AgentSettings",
    "OrchestratorClient",
    "OrchestratorRefused",
    "PassGate",
    "PrivacyGate",
    "RetryPolicy",
    "SiteAgent",
    "SiteGate",
    "SiteHome",
    "SiteRefused",
    "TaskContext",
    "TaskRefused",
    "TlsVerificationError",
    "connection_problem",
    "default_gates",
    "enroll_site",
    "run_agent",
]
