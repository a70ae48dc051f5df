"""Core: ids, the root error type, clock, hashing, configuration and tensor serialization.

Everything else in fedhealth may import this package; it imports nothing of fedhealth.
"""

from fedhealth.core._clock import Clock, ManualClock, SystemClock, token_lifetime_s, utcnow
from fedhealth.core._config import DATA_DIR_ENV, data_dir
from fedhealth.core._deadline import DeadlinePassedError, check_deadline, work_deadline
from fedhealth.core._errors import (
    BudgetExceededError,
    ChecksumError,
    ConfigError,
    ConflictError,
    CryptoError,
    DatasetError,
    DatasetMissingError,
    FedHealthError,
    GovernanceError,
    InputError,
    NotFoundError,
    PrivacyError,
    ProtocolError,
    ServiceUnavailableError,
    TensorError,
)
from fedhealth.core._files import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    Tightened,
    create_private_file,
    discard_interrupted_writes,
    make_private_dir,
    refuse_foreign_folder,
    secure_home,
    sync_folder,
    write_private_file,
)
from fedhealth.core._hashing import canonical_json, file_sha256, sha256_hex
from fedhealth.core._ids import is_valid_name, new_id
from fedhealth.core._malloc import keep_malloc_heaps
from fedhealth.core._tensors import (
    MAX_HEADER_BYTES,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    read_header,
    specs_of,
)

__all__ = [
    "DATA_DIR_ENV",
    "MAX_HEADER_BYTES",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "BudgetExceededError",
    "ChecksumError",
    "Clock",
    "ConfigError",
    "ConflictError",
    "CryptoError",
    "DatasetError",
    "DatasetMissingError",
    "DeadlinePassedError",
    "FedHealthError",
    "GovernanceError",
    "InputError",
    "ManualClock",
    "NotFoundError",
    "PrivacyError",
    "ProtocolError",
    "ServiceUnavailableError",
    "SystemClock",
    "TensorError",
    "TensorSpec",
    "Tightened",
    "canonical_json",
    "check_deadline",
    "create_private_file",
    "data_dir",
    "decode_tensors",
    "discard_interrupted_writes",
    "encode_tensors",
    "file_sha256",
    "is_valid_name",
    "keep_malloc_heaps",
    "make_private_dir",
    "new_id",
    "read_header",
    "refuse_foreign_folder",
    "secure_home",
    "sha256_hex",
    "specs_of",
    "sync_folder",
    "token_lifetime_s",
    "utcnow",
    "work_deadline",
    "write_private_file",
]
