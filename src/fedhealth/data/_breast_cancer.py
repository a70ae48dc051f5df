"""An offline federation: scikit-learn's Breast Cancer Wisconsin (diagnostic) data split into hospitals.

569 patients, 30 features, bundled with scikit-learn (no download). The label is 1 for malignant (212) and 0
for benign (357): the reverse of scikit-learn's coding, so that "positive" means disease as in heart-disease.

The split is seeded and heterogeneous the way real hospitals are:
- unequal sizes: the sites' shares of the patients are drawn from a Dirichlet(2) (the largest site is about
  4 times the smallest on average), above a floor of 10 malignant and 30 benign patients per site;
- label skew: each site's share is tilted by an independent log-normal factor (sigma 0.5) for each class, so
  prevalence differs between sites (by about 0.18 between extremes on average). Much stronger skew is easy
  to get but caps even a centrally trained model near 0.89 accuracy once every site scales its own features,
  which makes a poor demonstration;
- covariate skew: the patients of each class are ordered along a random direction of feature space (with
  noise, so regions overlap) and dealt to the sites in contiguous chunks, the same site order for both
  classes, so each site sees its own region of feature space, as hospitals serving different populations do.
(A per-site affine "calibration" shift would be invisible: each site standardizes its own features.)
Each site then gets its own stratified 70/30 train/test split and its own standardization (training mean and
std, ddof=1, as in Fed-Heart-Disease).
"""

from __future__ import annotations

import numpy as np

from fedhealth.core import ConfigError
from fedhealth.data._dataset import TabularDataset, fit_scaling, split_indices

_MIN_MALIGNANT = 10
_MIN_BENIGN = 30
_SIZE_CONCENTRATION = 2.0  # Dirichlet concentration of the sites' shares of the patients
_PREVALENCE_TILT = 0.5  # log-normal sigma tilting each site's share of one class against the other
_REGION_NOISE = 0.3  # in units of the rank scale [0, 1): how much neighbouring sites' regions overlap
TEST_FRACTION = 0.3


def _allocate(total: int, floor: int, shares: np.ndarray) -> np.ndarray:
    """Integers >= ``floor`` summing to ``total``, the surplus split by ``shares`` (largest remainder)."""
    surplus = total - floor * shares.size
    raw = shares * surplus
    counts = np.floor(raw).astype(np.int64)
    leftover = surplus - int(counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:leftover]] += 1
    return np.asarray(counts + floor, dtype=np.int64)


def breast_cancer_federation(n_sites: int = 4, seed: int = 0) -> list[TabularDataset]:
    """``n_sites`` hospitals (2 to 11) holding disjoint parts of the breast-cancer data; deterministic in
    ``seed``. Every site has at least 40 patients and both classes in its train and its test set."""
    from sklearn.datasets import load_breast_cancer  # scikit-learn loads slowly: on first use

    bunch = load_breast_cancer()
    X_all = np.asarray(bunch.data, dtype=np.float64)
    y_all = 1 - np.asarray(bunch.target, dtype=np.int64)  # 1 = malignant
    n_mal = int(y_all.sum())
    n_ben = int(y_all.size - n_mal)
    max_sites = min(n_mal // _MIN_MALIGNANT, n_ben // _MIN_BENIGN)
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or not 2 <= n_sites <= max_sites:
        raise ConfigError(
            f"breast-cancer federation: sites must be an integer from 2 to {max_sites}, got {n_sites!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"breast-cancer federation: seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)

    size_share = rng.dirichlet(np.full(n_sites, _SIZE_CONCENTRATION))
    tilt = np.exp(rng.normal(0.0, _PREVALENCE_TILT, size=(2, n_sites)))  # per site: malignant, benign
    mal_share = size_share * tilt[0] / (size_share * tilt[0]).sum()
    ben_share = size_share * tilt[1] / (size_share * tilt[1]).sum()
    mal_counts = _allocate(n_mal, _MIN_MALIGNANT, mal_share)
    ben_counts = _allocate(n_ben, _MIN_BENIGN, ben_share)

    z = (X_all - X_all.mean(axis=0)) / X_all.std(axis=0)
    direction = rng.standard_normal(z.shape[1])
    score = z @ (direction / np.linalg.norm(direction))
    rank = np.argsort(np.argsort(score, kind="stable"), kind="stable") / score.size
    noisy = rank + rng.normal(0.0, _REGION_NOISE, score.size)
    site_order = rng.permutation(n_sites)  # which site sits where along the direction

    members: list[list[int]] = [[] for _ in range(n_sites)]
    for label, counts in ((1, mal_counts), (0, ben_counts)):
        idx = np.flatnonzero(y_all == label)
        idx = idx[np.argsort(noisy[idx], kind="stable")]
        start = 0
        for site in site_order:
            members[site].extend(idx[start : start + counts[site]].tolist())
            start += int(counts[site])

    split_seeds = rng.integers(0, 2**31 - 1, size=n_sites)
    names = tuple(str(f).replace(" ", "_") for f in bunch.feature_names)
    sites = []
    for site in range(n_sites):
        rows = np.array(sorted(members[site]), dtype=np.int64)
        y = y_all[rows]
        train, test = split_indices(y, test_size=TEST_FRACTION, random_state=int(split_seeds[site]))
        scaling = fit_scaling(X_all[rows[train]])
        sites.append(
            TabularDataset(
                name=f"breast-cancer-{site}",
                X_train=scaling.apply(X_all[rows[train]]),
                y_train=y[train],
                X_test=scaling.apply(X_all[rows[test]]),
                y_test=y[test],
                feature_names=names,
                patient_ids_train=tuple(f"bc-{r:06d}" for r in rows[train]),
                patient_ids_test=tuple(f"bc-{r:06d}" for r in rows[test]),
                scaling=scaling,
            )
        )
    return sites
