"""The root of fedhealth's exception tree.

    FedHealthError
    ├── ConfigError               a setting or argument is unusable
    ├── InputError                bad input from outside (a request, a file, an update)
    │   └── TensorError           a tensor payload is malformed, mis-shaped, mis-typed or non-finite
    ├── NotFoundError             a named thing does not exist
    ├── ConflictError             the request contradicts the current state
    ├── DatasetError              a dataset cannot be read
    │   ├── DatasetMissingError   ... because its file is absent
    │   └── ChecksumError         ... because its file does not match the published checksum
    ├── CryptoError               a cryptographic check failed (always opaque on purpose)
    ├── ProtocolError             a protocol state machine was driven outside its transition table
    ├── PrivacyError              a differential-privacy rule would be broken
    │   └── BudgetExceededError   ... because the site's budget cannot pay for the release
    ├── GovernanceError           a governance rule refuses the action (approval, policy, consent)
    └── ServiceUnavailableError   a remote service cannot be reached

Packages derive their own errors from these; foreign exceptions (httpx, SQLAlchemy, numpy) are translated at
one boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class FedHealthError(Exception):
    """Base class of every error fedhealth raises on purpose."""


class ConfigError(FedHealthError):
    """A setting or argument is unusable."""


class InputError(FedHealthError):
    """Input from outside the process is malformed or violates a limit."""


class TensorError(InputError):
    """A tensor payload is malformed, has the wrong names, shapes or dtypes, or holds non-finite values."""


class NotFoundError(FedHealthError):
    """A named object does not exist."""


class ConflictError(FedHealthError):
    """The request contradicts the current state (e.g. a second, different upload for one task)."""


class DatasetError(FedHealthError):
    """A dataset cannot be read."""


class DatasetMissingError(DatasetError):
    """A dataset file is absent and cannot be downloaded."""


class ChecksumError(DatasetError):
    """A dataset file does not match its published checksum."""


class CryptoError(FedHealthError):
    """A cryptographic verification failed. The message is deliberately uninformative."""


class ProtocolError(FedHealthError):
    """A protocol state machine received a message or call its transition table does not allow."""


class PrivacyError(FedHealthError):
    """A differential-privacy rule would be broken."""


class BudgetExceededError(PrivacyError):
    """The privacy budget cannot pay for the requested release."""


class GovernanceError(FedHealthError):
    """A governance rule (approval, policy, consent) refuses the action."""


class ServiceUnavailableError(FedHealthError):
    """A remote service cannot be reached or keeps failing."""
