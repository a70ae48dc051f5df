"""Privacy: clipping and noise, DP-SGD helpers, accounting through Google's dp-accounting, noise calibration
from a target epsilon, and the per-dataset budget ledger (check, then commit).

Releases (:class:`DpSgdRelease`, :class:`GaussianRelease`) are declarative values that serialize to JSON;
a :class:`DpPlan` composes them; :func:`epsilon` accounts a plan (PLD by default, RDP on request);
:func:`calibrate_noise` inverts it; :class:`BudgetLedger` enforces a site's budget per dataset. Imports
nothing above ``fedhealth.core``.
"""

from fedhealth.privacy._accounting import (
    PLD_EPSILON_CEILING,
    PLD_VALUE_DISCRETIZATION,
    AccountantKind,
    DpPlan,
    DpRelease,
    DpSgdRelease,
    GaussianRelease,
    Mechanism,
    check_delta,
    check_sample_rate,
    compose,
    epsilon,
    make_accountant,
    release_from_json,
)
from fedhealth.privacy._analysis import gaussian_dp_delta, gaussian_dp_epsilon, gaussian_mu
from fedhealth.privacy._calibration import (
    DEFAULT_REL_TOL,
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    calibrate_noise,
)
from fedhealth.privacy._dpsgd import DpSgdReport, noisy_clipped_sum
from fedhealth.privacy._errors import (
    BudgetNotSetError,
    CalibrationError,
    DpParameterError,
    ReservationStateError,
    TaskOverBudgetError,
)
from fedhealth.privacy._ledger import (
    Budget,
    BudgetCheck,
    BudgetLedger,
    BudgetStatement,
    Reservation,
    SpendReceipt,
    SpendStatus,
    StudySpend,
    sqlite_engine,
)
from fedhealth.privacy._mechanisms import (
    NoiseMode,
    RandomSource,
    SecureRandom,
    SiteUpdateDp,
    clip_by_l2_norm,
    clip_headroom_stds,
    clip_per_example,
    clip_tail_mass,
    gaussian_noise,
    global_l2_norm,
    poisson_sample,
    secure_generator,
    snap,
    snap_grid,
)

__all__ = [
    "DEFAULT_REL_TOL",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "PLD_EPSILON_CEILING",
    "PLD_VALUE_DISCRETIZATION",
    "AccountantKind",
    "Budget",
    "BudgetCheck",
    "BudgetLedger",
    "BudgetNotSetError",
    "BudgetStatement",
    "CalibrationError",
    "DpParameterError",
    "DpPlan",
    "DpRelease",
    "DpSgdRelease",
    "DpSgdReport",
    "GaussianRelease",
    "Mechanism",
    "NoiseMode",
    "RandomSource",
    "Reservation",
    "ReservationStateError",
    "SecureRandom",
    "SiteUpdateDp",
    "SpendReceipt",
    "SpendStatus",
    "StudySpend",
    "TaskOverBudgetError",
    "calibrate_noise",
    "check_delta",
    "check_sample_rate",
    "clip_by_l2_norm",
    "clip_headroom_stds",
    "clip_per_example",
    "clip_tail_mass",
    "compose",
    "epsilon",
    "gaussian_dp_delta",
    "gaussian_dp_epsilon",
    "gaussian_mu",
    "gaussian_noise",
    "global_l2_norm",
    "make_accountant",
    "noisy_clipped_sum",
    "poisson_sample",
    "release_from_json",
    "secure_generator",
    "snap",
    "snap_grid",
    "sqlite_engine",
]
