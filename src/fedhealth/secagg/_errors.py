"""SecAgg+'s own errors, placed in fedhealth's tree.

ProtocolError (fedhealth.core)
└── SecAggProtocolError        a stage was driven outside the transition table, or a message contradicts
    │                          the protocol (wrong round, unknown site, duplicate, malformed content)
    ├── SecAggSecurityError    a peer or the server lied: bad signature, substituted or reused key,
    │                          tampered share, a request for both shares of one site (also a CryptoError)
    └── RoundFailedError       the round cannot complete (too few sites left); nothing was revealed
InputError (fedhealth.core)
└── SecAggMessageError         bytes that do not decode into a well-formed message
"""

from __future__ import annotations

from enum import Enum

from fedhealth.core import CryptoError, InputError, ProtocolError


class FailureReason(Enum):
    """Why a round stopped without a result."""

    TOO_FEW_SITES = "too_few_sites"
    """Fewer than ``threshold`` sites answered a stage."""
    NEIGHBOURHOOD_TOO_SMALL = "neighbourhood_too_small"
    """A site's secrets cannot be reconstructed: too few of its share holders are left."""
    SURVIVORS_DISCONNECTED = "survivors_disconnected"
    """The surviving sites split the neighbourhood graph; finishing would reveal partial sums."""
    INCONSISTENT_SHARES = "inconsistent_shares"
    """Reconstructed secrets do not match the commitments the sites made."""
    ABORTED = "aborted"
    """The driver aborted the round."""


class SecAggProtocolError(ProtocolError):
    """The SecAgg+ state machine was driven outside its transition table or got a contradictory message."""


class SecAggSecurityError(SecAggProtocolError, CryptoError):
    """A peer or the server misbehaved in a way that could break privacy. The party that raises it aborts."""


class RoundFailedError(SecAggProtocolError):
    """The round cannot complete; it failed cleanly and revealed nothing about any site's input."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class SecAggMessageError(InputError):
    """Bytes or JSON that do not decode into a well-formed SecAgg+ message."""
