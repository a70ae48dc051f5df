"""Binary logistic regression in numpy: the built-in recipe every site can run without a deep-learning stack.

Parameters are ``{"weight": (n_features,), "bias": (1,)}`` in float32 on the wire; all arithmetic is float64.
Pure functions of (parameters, data, config, generator): the same inputs give the same bytes out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

from fedhealth.core import InputError, TensorSpec, check_deadline
from fedhealth.learning._checks import check_features_labels, check_tensors
from fedhealth.learning._config import LocalOptimizer, LogRegConfig
from fedhealth.learning._errors import TrainingDivergedError
from fedhealth.learning._results import EvalResult, TrainResult

# torch.optim.Adam's defaults, which FLamby's baselines use
_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-8


def logreg_param_specs(n_features: int) -> list[TensorSpec]:
    """The tensors of a logistic-regression model, sorted by name (as ``fedhealth.core.specs_of`` sorts)."""
    if n_features < 1:
        raise InputError(f"n_features must be positive, got {n_features}")
    return [
        TensorSpec(name="bias", shape=(1,), dtype="float32"),
        TensorSpec(name="weight", shape=(n_features,), dtype="float32"),
    ]


def logreg_init(n_features: int, seed: int) -> dict[str, np.ndarray]:
    """The initial global model: all zeros.

    The loss is convex, so the starting point does not change the optimum it heads for; zeros make every study
    start from the same, data-free model (nothing to leak, nothing to agree on) and predict p = 0.5 for every
    patient. ``seed`` is accepted so that a randomized recipe can take its place without an API change.
    """
    del seed  # zeros need no randomness; see the docstring
    specs = logreg_param_specs(n_features)
    return {s.name: np.zeros(s.shape, dtype=np.float32) for s in specs}


def bce_with_logits(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example binary cross-entropy of labels ``y`` under logits ``z``: ``log(1 + e^z) - y z``.

    ``logaddexp`` keeps it finite and accurate for any finite logit (no ``log(0)`` at |z| = 1000).
    """
    return np.asarray(np.logaddexp(0.0, logits) - y * logits, dtype=np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function without overflow: exp is only ever taken of -|z|."""
    e = np.exp(-np.abs(z))
    return np.asarray(np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)), dtype=np.float64)


def _unpack(params: Mapping[str, np.ndarray], n_features: int, what: str) -> np.ndarray:
    """Check a parameter dict and return theta = [weight..., bias] in float64."""
    check_tensors(what, params, {"weight": (n_features,), "bias": (1,)})
    return np.concatenate([params["weight"].astype(np.float64), params["bias"].astype(np.float64)])


def _pack(theta: np.ndarray) -> dict[str, np.ndarray]:
    return {"weight": theta[:-1].astype(np.float32), "bias": theta[-1:].astype(np.float32)}


def _augment(X: np.ndarray) -> np.ndarray:
    """Append a column of ones so the bias is the last coordinate of theta."""
    return np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)


def logreg_objective(
    params: Mapping[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    *,
    l2: float = 0.0,
    proximal_mu: float = 0.0,
    anchor: Mapping[str, np.ndarray] | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """The local objective and its gradient (float64), the quantity :func:`logreg_train` descends.

    ``mean BCE + l2/2 ||weight||^2 + proximal_mu/2 ||theta - anchor||^2``; ``anchor`` (the global model) is
    required when ``proximal_mu > 0``.
    """
    n_features = int(np.asarray(params["weight"]).shape[0]) if "weight" in params else 0
    theta = _unpack(params, n_features, "params")
    X64, y64 = check_features_labels(X, y, n_features)
    if X64.shape[0] == 0:
        raise InputError("the objective needs at least one row")
    theta0 = _unpack(anchor, n_features, "anchor") if anchor is not None else None
    if proximal_mu > 0 and theta0 is None:
        raise InputError("proximal_mu > 0 needs the anchor (global) parameters")
    Xa = _augment(X64)
    z = Xa @ theta
    loss = float(bce_with_logits(z, y64).mean())
    grad = Xa.T @ (_sigmoid(z) - y64) / X64.shape[0]
    w = theta[:-1]
    loss += 0.5 * l2 * float(w @ w)
    grad[:-1] += l2 * w
    if theta0 is not None and proximal_mu > 0:
        diff = theta - theta0
        loss += 0.5 * proximal_mu * float(diff @ diff)
        grad += proximal_mu * diff
    return loss, {"weight": grad[:-1].copy(), "bias": grad[-1:].copy()}


def logreg_per_example_gradients(
    params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray
) -> dict[str, np.ndarray]:
    """Gradients of each example's BCE alone (float64): ``weight`` (rows, n_features), ``bias`` (rows, 1).

    The building block of DP-SGD, which clips each example's gradient before summing.
    """
    n_features = int(np.asarray(params["weight"]).shape[0]) if "weight" in params else 0
    theta = _unpack(params, n_features, "params")
    X64, y64 = check_features_labels(X, y, n_features)
    residual = _sigmoid(_augment(X64) @ theta) - y64
    return {"weight": residual[:, None] * X64, "bias": residual[:, None].copy()}


def _batches(n: int, config: LogRegConfig, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The minibatch index arrays of one round, in order (see :class:`LogRegConfig`), one at a time: a
    round of 10,000 epochs of batches of one row must not hold every batch of the round at once. Each epoch's
    order is drawn when the epoch starts; nothing else draws from ``rng`` meanwhile."""
    size = config.batch_size
    if config.local_steps is None:
        for _ in range(config.local_epochs):
            order = rng.permutation(n)
            for i in range(0, n, size):
                yield order[i : i + size]
        return
    made = 0
    while made < config.local_steps:
        order = rng.permutation(n)
        for i in range(0, n, size):
            yield order[i : i + size]
            made += 1
            if made == config.local_steps:
                return


def _batch_count(n: int, config: LogRegConfig) -> int:
    if config.local_steps is None:
        return config.local_epochs * -(-n // config.batch_size)
    return config.local_steps


def logreg_train(
    params: Mapping[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    config: LogRegConfig,
    rng: np.random.Generator,
) -> TrainResult:
    """Train from the global ``params`` on ``(X, y)`` for one round; return the local parameters.

    Minibatch SGD or Adam (fresh moment estimates every round, as FLamby's clients do) on the objective of
    :class:`LogRegConfig`. ``train_loss`` is the mean BCE (data term only) over every example the round saw,
    measured on each batch just before its step, like a PyTorch training loop's running loss; with no steps at
    all (``local_epochs=0``) it is the BCE of ``params`` on the whole set. The only randomness is the batch
    order, drawn from ``rng``.
    """
    theta0 = _unpack(params, config.n_features, "global params")
    X64, y64 = check_features_labels(X, y, config.n_features)
    n = X64.shape[0]
    if n == 0:
        raise InputError("local training needs at least one row")
    Xa = _augment(X64)
    theta = theta0.copy()
    reg_mask = np.ones_like(theta)
    reg_mask[-1] = 0.0  # no L2 on the bias
    l2_vec = config.l2 * reg_mask
    mu = config.proximal_mu
    lr = config.learning_rate
    adam = config.optimizer is LocalOptimizer.ADAM
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)

    loss_sum = 0.0
    seen = 0
    steps = 0
    batches = _batches(n, config, rng)
    # overflow is detected below and reported as divergence, not left to numpy warnings
    with np.errstate(over="ignore", invalid="ignore"):
        for t, idx in enumerate(batches, start=1):
            check_deadline()  # past the round's deadline no update is taken: stop (core/_deadline.py)
            xb = Xa[idx]
            yb = y64[idx]
            z = xb @ theta
            loss_sum += float(bce_with_logits(z, yb).sum())
            seen += idx.shape[0]
            steps = t
            grad = xb.T @ (_sigmoid(z) - yb) / idx.shape[0] + l2_vec * theta
            if mu > 0:
                grad += mu * (theta - theta0)
            if adam:
                m = _ADAM_BETA1 * m + (1 - _ADAM_BETA1) * grad
                v = _ADAM_BETA2 * v + (1 - _ADAM_BETA2) * grad * grad
                m_hat = m / (1 - _ADAM_BETA1**t)
                v_hat = v / (1 - _ADAM_BETA2**t)
                theta = theta - lr * m_hat / (np.sqrt(v_hat) + _ADAM_EPS)
            else:
                theta = theta - lr * grad
            if not math.isfinite(loss_sum):
                break
    if not math.isfinite(loss_sum) or not np.isfinite(theta).all():
        raise TrainingDivergedError(
            f"local training diverged (non-finite loss or parameters) at step {steps}, learning rate {lr}"
        )
    train_loss = loss_sum / seen if seen else float(bce_with_logits(Xa @ theta, y64).mean())
    return TrainResult(
        params=_pack(theta), num_samples=n, train_loss=train_loss, steps=_batch_count(n, config)
    )


def logreg_predict_proba(params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """P(y = 1 | x) for each row of ``X`` (float64)."""
    n_features = int(np.asarray(params["weight"]).shape[0]) if "weight" in params else 0
    theta = _unpack(params, n_features, "params")
    X64, _ = check_features_labels(X, np.zeros(np.asarray(X).shape[0]), n_features)
    return np.asarray(_sigmoid(_augment(X64) @ theta), dtype=np.float64)


def logreg_evaluate(params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> EvalResult:
    """Mean BCE, accuracy (positive when p > 0.5, FLamby's rule) and ROC AUC of ``params`` on ``(X, y)``."""
    n_features = int(np.asarray(params["weight"]).shape[0]) if "weight" in params else 0
    theta = _unpack(params, n_features, "params")
    X64, y64 = check_features_labels(X, y, n_features)
    if X64.shape[0] == 0:
        raise InputError("evaluation needs at least one row")
    z = _augment(X64) @ theta
    loss = float(bce_with_logits(z, y64).mean())
    accuracy = float(((z > 0).astype(np.float64) == y64).mean())  # z > 0  <=>  sigmoid(z) > 0.5
    from sklearn.metrics import roc_auc_score  # scikit-learn loads slowly: on first use

    auc = float(roc_auc_score(y64, z)) if np.unique(y64).size == 2 else None
    return EvalResult(num_samples=int(X64.shape[0]), loss=loss, accuracy=accuracy, auc=auc)
