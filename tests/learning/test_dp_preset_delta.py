"""A DP preset whose delta is at or above 1/n for a site's n records is refused (issue 10, finding 18): a
mechanism that publishes one random record outright is (0, 1/n)-DP, so such a delta protects nobody."""

from __future__ import annotations

import dataclasses

import pytest

from fedhealth.core import ConfigError
from fedhealth.learning import HEART_DISEASE_DP_PRESETS, HEART_DISEASE_TRAIN_RECORDS, DpPreset


def preset(**changes: object) -> DpPreset:
    return dataclasses.replace(HEART_DISEASE_DP_PRESETS[(1.0, 1e-3)], **changes)  # type: ignore[arg-type]


def test_every_heart_disease_preset_has_delta_below_one_over_its_largest_site():
    for p in HEART_DISEASE_DP_PRESETS.values():
        assert p.largest_site_records == max(HEART_DISEASE_TRAIN_RECORDS) == 199
        assert p.delta < 1 / 199
        for records in HEART_DISEASE_TRAIN_RECORDS:
            p.check_site_records(records)


@pytest.mark.parametrize(("delta", "records"), [(1e-2, 100), (1e-2, 199), (5e-3, 200), (1e-3, 1000)])
def test_a_preset_with_delta_at_or_above_one_over_n_is_refused(delta, records):
    with pytest.raises(ConfigError, match=r"is not below 1/n .* for a site of \d+ training records"):
        preset(delta=delta, largest_site_records=records)
    with pytest.raises(ConfigError, match="not below 1/n"):
        preset(delta=delta).check_site_records(records)


def test_the_usual_delta_is_accepted_for_a_large_site():
    preset(delta=1e-5, largest_site_records=50_000)
