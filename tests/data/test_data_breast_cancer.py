import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from fedhealth.core import ConfigError
from fedhealth.data import breast_cancer_federation


def test_federation_is_deterministic_per_seed_and_differs_between_seeds():
    a = breast_cancer_federation(4, seed=0)
    b = breast_cancer_federation(4, seed=0)
    c = breast_cancer_federation(4, seed=1)
    assert [d.fingerprint for d in a] == [d.fingerprint for d in b]
    assert [d.fingerprint for d in a] != [d.fingerprint for d in c]


@pytest.mark.parametrize("seed", range(5))
def test_sites_differ_in_size_and_label_balance(seed):
    sites = breast_cancer_federation(4, seed)
    sizes = [d.num_train + d.num_test for d in sites]
    prevalence = [float(np.concatenate([d.y_train, d.y_test]).mean()) for d in sites]
    assert len(set(sizes)) > 1
    assert max(sizes) >= 1.2 * min(sizes)
    assert max(prevalence) - min(prevalence) >= 0.05


@pytest.mark.parametrize(("n_sites", "seed"), [(2, 0), (4, 3), (7, 1), (11, 2)])
def test_every_site_is_usable_and_the_sites_partition_the_data(n_sites, seed):
    sites = breast_cancer_federation(n_sites, seed)
    assert len(sites) == n_sites
    for d in sites:
        assert d.num_train + d.num_test >= 40
        assert set(d.y_train.tolist()) == {0, 1}
        assert set(d.y_test.tolist()) == {0, 1}
        np.testing.assert_allclose(d.X_train.mean(axis=0), 0, atol=1e-9)  # own standardization
    ids = [i for d in sites for i in d.patient_ids_train]
    assert len(ids) == len(set(ids))
    assert sum(d.num_train + d.num_test for d in sites) == 569
    malignant = sum(int(d.y_train.sum() + d.y_test.sum()) for d in sites)
    assert malignant == int((load_breast_cancer().target == 0).sum())  # label 1 = malignant


def test_sites_occupy_different_regions_of_feature_space():
    # covariate skew: the raw means of a site's patients differ between sites by more than random
    # partitions of the same sizes would give
    data = load_breast_cancer().data
    sites = breast_cancer_federation(4, 0)
    rows = [[int(pid.split("-")[1]) for pid in d.patient_ids_train] for d in sites]
    spread = np.ptp([data[r].mean(axis=0) / data.std(axis=0) for r in rows], axis=0).max()
    rng = np.random.default_rng(0)
    random_spreads = []
    for _ in range(50):
        perm = rng.permutation(len(data))
        cuts = np.cumsum([len(r) for r in rows])[:-1]
        parts = np.split(perm[: sum(len(r) for r in rows)], cuts)
        random_spreads.append(np.ptp([data[p].mean(axis=0) / data.std(axis=0) for p in parts], axis=0).max())
    assert spread > np.max(random_spreads)


@pytest.mark.parametrize(("n_sites", "seed"), [(1, 0), (12, 0), (4, -1), (True, 0)])
def test_bad_federation_settings_are_refused(n_sites, seed):
    with pytest.raises(ConfigError):
        breast_cancer_federation(n_sites, seed)
