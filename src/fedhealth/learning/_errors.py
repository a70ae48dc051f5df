"""Errors of the learning layer, under fedhealth.core's tree.

FedHealthError
├── TrainingDivergedError       local training produced non-finite parameters (learning rate too high)
└── InputError
    └── RecipeError             the study's recipe cannot run here
        ├── UnknownRecipeError  no installed recipe has that name and version (or its plug-in fails to load)
        └── RecipeParamsError   the recipe's parameter model refuses ``recipe.params`` ("field: rule" lines)
"""

from __future__ import annotations

from fedhealth.core import FedHealthError, InputError


class TrainingDivergedError(FedHealthError):
    """Local training produced NaN or infinite parameters; nothing may be uploaded from this round."""


class RecipeError(InputError):
    """A study's recipe cannot run in this installation, as named or with these parameters. At the
    orchestrator the study is refused (422 with this message); a site refuses its task before reading any
    data (failure code ``invalid_recipe``; the message stays in the site's own log)."""


class UnknownRecipeError(RecipeError):
    """No installed recipe has the name, or not the version, a study names."""


class RecipeParamsError(RecipeError):
    """The recipe's parameter model refuses the study's ``recipe.params``; ``problems`` holds one
    ``recipe.params.<field>: <rule>`` line per violation."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)
