"""Site agent: the service next to a hospital's data. It dials out only, long-polls for tasks, trains locally
and uploads updates, retrying with backoff whenever the orchestrator is unreachable.
"""

from fedhealth.agent._agent import AgentSettings, SiteAgent, SiteRefused, run_agent
from fedhealth.agent._approvals import (
    ApprovalSync,
    SyncResult,
    fetch_pending,
    report_approval,
    report_decision,
    review,
    site_client,
    spec_summary,
    sync_approvals,
    was_reviewed,
)
from fedhealth.agent._check import SiteCheck, run_site_check
from fedhealth.agent._client import (
    OrchestratorClient,
    OrchestratorRefused,
    RetryPolicy,
    TlsVerificationError,
    connection_problem,
)
from fedhealth.agent._datasets import (
    DatasetCheckError,
    DatasetSummary,
    SiteDatasets,
    check_dataset,
    csv_uri,
    datasets_for_serve,
    feeds_consent,
    sync_consent,
)
from fedhealth.agent._gates import default_gates
from fedhealth.agent._governance import SiteGovernance, report_withdrawals, withdrawal_notices
from fedhealth.agent._home import SiteHome, enroll_site
from fedhealth.agent._pipeline import PassGate, SiteGate, TaskContext, TaskRefused
from fedhealth.agent._privacy import PrivacyGate

__all__ = [
    "AgentSettings",
    "ApprovalSync",
    "DatasetCheckError",
    "DatasetSummary",
    "OrchestratorClient",
    "OrchestratorRefused",
    "PassGate",
    "PrivacyGate",
    "RetryPolicy",
    "SiteAgent",
    "SiteCheck",
    "SiteDatasets",
    "SiteGate",
    "SiteGovernance",
    "SiteHome",
    "SiteRefused",
    "SyncResult",
    "TaskContext",
    "TaskRefused",
    "TlsVerificationError",
    "check_dataset",
    "connection_problem",
    "csv_uri",
    "datasets_for_serve",
    "default_gates",
    "enroll_site",
    "feeds_consent",
    "fetch_pending",
    "report_approval",
    "report_decision",
    "report_withdrawals",
    "review",
    "run_agent",
    "run_site_check",
    "site_client",
    "spec_summary",
    "sync_approvals",
    "sync_consent",
    "was_reviewed",
    "withdrawal_notices",
]
