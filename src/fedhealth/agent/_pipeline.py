"""The site's task pipeline: the checks a task passes through before, while and after it touches data.

A task goes through every :class:`SiteGate` in order:

1. ``before_data``   approval, policy, privacy budget: may refuse (``TaskRefused``) before any data is read;
2. ``prepare_data``  consent filtering and the minimum cohort: may drop rows or refuse;
3. (training or evaluation, in ``fedhealth.runtime``)
4. ``after_training`` commit what was spent;
5. ``attest``         facts for the orchestrator (audit head, fingerprints, ledger), no patient data.

``on_refused`` and ``on_failed`` let a gate undo or record what it began (e.g. release a budget reservation
when no data was read). The gates are independent: governance and privacy each implement one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from fedhealth.core import FedHealthError
from fedhealth.data import TabularDataset
from fedhealth.protocol import SiteAttestation, Task


class TaskRefused(FedHealthError):
    """The site will not do this task. ``code`` is the rule that refused (machine-readable)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class TaskContext:
    """One task at one site, as it moves through the pipeline. ``state`` holds each gate's private notes."""

    task: Task
    site: str
    # set once computation on patient rows begins (after loading, schema checks and consent): a failure
    # before it releases the task's budget reservation, one after it is charged
    data_read: bool = False
    attestation: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    def site_attestation(self) -> SiteAttestation | None:
        return SiteAttestation.model_validate(self.attestation) if self.attestation else None


class SiteGate(Protocol):
    def before_data(self, ctx: TaskContext) -> None: ...

    def prepare_data(self, ctx: TaskContext, dataset: TabularDataset) -> TabularDataset: ...

    def after_training(self, ctx: TaskContext) -> None: ...

    def on_refused(self, ctx: TaskContext, refusal: TaskRefused) -> None: ...

    def on_failed(self, ctx: TaskContext, error: BaseException) -> None: ...

    def attest(self, ctx: TaskContext) -> None: ...


class PassGate:
    """A gate that changes nothing; subclass it and override the hooks you need."""

    def before_data(self, ctx: TaskContext) -> None:
        return None

    def prepare_data(self, ctx: TaskContext, dataset: TabularDataset) -> TabularDataset:
        return dataset

    def after_training(self, ctx: TaskContext) -> None:
        return None

    def on_refused(self, ctx: TaskContext, refusal: TaskRefused) -> None:
        return None

    def on_failed(self, ctx: TaskContext, error: BaseException) -> None:
        return None

    def attest(self, ctx: TaskContext) -> None:
        return None
