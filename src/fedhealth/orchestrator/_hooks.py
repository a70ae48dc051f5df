"""Extension points of the orchestrator: features that watch studies (audit, provenance, privacy views)
register a :class:`StudyObserver` instead of editing the round engine.

Observers are called on the event loop, after the store has committed the change they hear about. An
observer that raises on ``check_study`` refuses the study (422 with its message); anything an observer raises
elsewhere is logged and does not stop the round engine.
"""

from __future__ import annotations

from typing import Protocol

from fedhealth.orchestrator._store import ModelVersion, RoundRow, StudyRow, TaskRow
from fedhealth.protocol import StudySpec, Task


class StudyObserver(Protocol):
    def check_study(self, spec: StudySpec, owner: str) -> None:
        """Before a study is stored: raise a FedHealthError to refuse it."""

    def study_created(self, study: StudyRow, owner: str) -> None: ...

    def task_closed(self, task: TaskRow) -> None:
        """A task got its result, failed, was rejected or timed out (its row is final)."""

    def tasks_closed(self, tasks: list[TaskRow]) -> None:
        """Several tasks closed at once (a secure round's end): as ``task_closed`` for each."""

    def round_finished(
        self, study: StudyRow, round_row: RoundRow, tasks: list[TaskRow], version: ModelVersion | None
    ) -> None:
        """A round closed (completed or failed); ``version`` is the new model, if one was made."""

    def study_finished(self, study: StudyRow) -> None: ...

    def decorate_task(self, task: Task) -> Task:
        """Add to a task on its way to a site (e.g. round commitments to anchor), or return it unchanged."""


class NullObserver:
    """Does nothing; subclass it and override what you need."""

    def check_study(self, spec: StudySpec, owner: str) -> None:
        return None

    def study_created(self, study: StudyRow, owner: str) -> None:
        return None

    def task_closed(self, task: TaskRow) -> None:
        return None

    def tasks_closed(self, tasks: list[TaskRow]) -> None:
        for task in tasks:
            self.task_closed(task)

    def round_finished(
        self, study: StudyRow, round_row: RoundRow, tasks: list[TaskRow], version: ModelVersion | None
    ) -> None:
        return None

    def study_finished(self, study: StudyRow) -> None:
        return None

    def decorate_task(self, task: Task) -> Task:
        return task
