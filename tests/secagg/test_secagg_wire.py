"""Messages: exact byte round trips, 4 bytes per parameter on the wire, malformed input refused; masks."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_federation import make_federation

from fedhealth.core import InputError, canonical_json
from fedhealth.crypto import keystream_uint32
from fedhealth.secagg import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    SecAggMessageError,
    ShareBundle,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
    run_in_memory,
)
from fedhealth.secagg._crypto_extra import CHUNK, apply_masks, mask_of


def _one_round_of_messages() -> list[object]:
    fed = make_federation(3, 2, 7)
    site = "site-00"
    out: list[object] = []
    out.append(advert := fed.clients[site].advertise_keys())
    fed.server.receive(advert)
    for s in fed.sites[1:]:
        fed.server.receive(fed.clients[s].advertise_keys())
    directories = fed.server.close_stage()
    out.append(directories[site])
    for s in fed.sites:
        shares = fed.clients[s].share_keys(directories[s])  # type: ignore[arg-type]
        out.append(shares)
        fed.server.receive(shares)
    bundles = fed.server.close_stage()
    out.append(bundles[site])
    inputs = fed.inputs(0)
    for s in fed.sites:
        masked = fed.clients[s].masked_input(bundles[s], inputs[s])  # type: ignore[arg-type]
        out.append(masked)
        fed.server.receive(masked)
    checks = fed.server.close_stage()
    out.append(checks[site])
    for s in fed.sites:
        signature = fed.clients[s].consistency(checks[s])  # type: ignore[arg-type]
        out.append(signature)
        fed.server.receive(signature)
    requests = fed.server.close_stage()
    out.append(requests[site])
    out.append(fed.clients[site].unmask(requests[site]))  # type: ignore[arg-type]
    return out


def test_one_round_has_every_message_kind() -> None:
    kinds = {type(m) for m in _one_round_of_messages()}
    assert kinds == {
        KeyAdvertisement,
        KeyDirectory,
        EncryptedShares,
        ShareBundle,
        MaskedInput,
        ConsistencyRequest,
        ConsistencySignature,
        UnmaskRequest,
        UnmaskResponse,
    }


def test_every_message_round_trips_through_its_bytes() -> None:
    for message in _one_round_of_messages():
        data = message.to_bytes()  # type: ignore[attr-defined]
        again = type(message).from_bytes(data)  # type: ignore[attr-defined]
        decoded = decode_message(data)
        assert type(decoded) is type(message)
        if isinstance(message, MaskedInput):
            assert isinstance(again, MaskedInput)
            assert np.array_equal(again.vector, message.vector)
            assert again.site_id == message.site_id
            assert again.config_digest == message.config_digest
        else:
            assert again == message
            assert decoded == message
            assert again.to_bytes() == data  # type: ignore[attr-defined]
            assert data == canonical_json(message.to_json())  # type: ignore[attr-defined]


def test_masked_input_is_four_bytes_per_entry_plus_a_small_header() -> None:
    for length in (1, 1000, 100_003):
        vector = np.arange(length, dtype=np.uint32)
        message = MaskedInput(site_id="site-00", config_digest=bytes(32), vector=vector)
        data = message.to_bytes()
        assert 4 * length < len(data) <= 4 * length + 160
        assert data[-4 * length :] == vector.astype("<u4").tobytes()  # raw little-endian uint32


def test_masked_input_travels_as_safetensors() -> None:
    vector = np.arange(10, dtype=np.uint32) * 7
    message = MaskedInput(site_id="site-03", config_digest=b"\x05" * 32, vector=vector)
    again = MaskedInput.from_safetensors(message.to_safetensors(), 10)
    assert np.array_equal(again.vector, vector)
    assert again.site_id == "site-03"
    assert again.config_digest == b"\x05" * 32
    with pytest.raises(SecAggMessageError):
        MaskedInput.from_safetensors(message.to_safetensors(), 11)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"kind": "secagg.key_advertisement"}',
        b'{"kind": "secagg.nope"}',
        b"FHSAMI01\xff\xff\xff\xff",
        b"FHSAMI01\x02\x00\x00\x00{}",
    ],
)
def test_malformed_bytes_are_refused_with_the_message_error(data: bytes) -> None:
    with pytest.raises(SecAggMessageError) as info:
        decode_message(data)
    assert isinstance(info.value, InputError)


def test_masked_input_with_a_truncated_body_is_refused() -> None:
    data = MaskedInput(
        site_id="site-00", config_digest=bytes(32), vector=np.ones(8, dtype=np.uint32)
    ).to_bytes()
    with pytest.raises(SecAggMessageError):
        MaskedInput.from_bytes(data[:-1])


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (KeyAdvertisement, "signature", "AAAA"),
        (KeyAdvertisement, "site_id", "Not A Site"),
        (KeyAdvertisement, "config_digest", "!!!"),
        (KeyDirectory, "advertisements", [1, 2]),
        (EncryptedShares, "boxes", [{"sender": "site-01", "recipient": "site-00", "ciphertext": "AA=="}]),
        (ShareBundle, "boxes", "x"),
        (ConsistencyRequest, "survivors", ["site-01", "site-00"]),
        (ConsistencyRequest, "survivors", ["site-00", "site-00"]),
        (ConsistencySignature, "signature", "AAAA"),
        (UnmaskRequest, "survivors", ["site-01", "site-00"]),
        (UnmaskRequest, "signatures", [{"site_id": "site-00", "signature": "AAAA"}]),
        (UnmaskRequest, "signatures", "x"),
        (
            UnmaskRequest,
            "signatures",
            [
                {"site_id": "site-01", "signature": "A" * 86 + "=="},
                {"site_id": "site-00", "signature": "A" * 86 + "=="},
            ],
        ),
        (
            UnmaskRequest,
            "signatures",
            [
                {"site_id": "site-00", "signature": "A" * 86 + "=="},
                {"site_id": "site-00", "signature": "A" * 86 + "=="},
            ],
        ),
        (UnmaskResponse, "shares", [{"owner": "site-00", "kind": "both", "share": "AA=="}]),
    ],
)
def test_malformed_fields_are_refused(cls: type, field: str, value: object) -> None:
    message = next(m for m in _one_round_of_messages() if type(m) is cls)
    data = message.to_json()  # type: ignore[attr-defined]
    data[field] = value
    with pytest.raises(SecAggMessageError):
        cls.from_json(data)  # type: ignore[attr-defined]


def test_masks_are_the_aes_ctr_keystream_added_mod_2_32_across_chunk_boundaries() -> None:
    length = CHUNK * 2 + 123
    seeds = [bytes([i]) * 32 for i in range(1, 5)]
    base = np.arange(length, dtype=np.uint32) * np.uint32(2654435761)
    target = base.copy()
    apply_masks(target, add=seeds[:3], subtract=seeds[3:])
    # the reference uses fedhealth.crypto's own keystream and Python-int arithmetic mod 2**32
    expected = base.astype(np.uint64)
    for s in seeds[:3]:
        expected = expected + keystream_uint32(s, length).astype(np.uint64)
    expected = (expected + (1 << 32) - keystream_uint32(seeds[3], length).astype(np.uint64)) % (1 << 32)
    assert np.array_equal(target.astype(np.uint64), expected)
    assert np.array_equal(mask_of(seeds[0], 10), keystream_uint32(seeds[0], 10))


def test_masks_refuse_wrong_vectors_and_seeds() -> None:
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype=np.int64), add=[bytes(32)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype=np.uint32), add=[bytes(16)])


def test_client_refuses_an_input_of_the_wrong_shape_or_type_without_changing_stage() -> None:
    fed = make_federation(3, 2, 4)
    bundles = fed.share(fed.advertise())
    client = fed.clients["site-00"]
    for bad in (np.zeros(5, dtype=np.uint32), np.zeros(4, dtype=np.float32)):
        with pytest.raises(InputError):
            client.masked_input(bundles["site-00"], bad)
    assert client.stage.value == "masked_input"


def test_in_memory_driver_counts_uploads_per_site() -> None:
    fed = make_federation(3, 2, 100)
    seen = run_in_memory(fed.server, fed.clients, fed.inputs(0))
    assert seen.result is not None
    assert set(seen.upload_bytes) == set(fed.sites)
    for site in fed.sites:
        assert seen.masked_input_bytes[site] <= 4 * 100 + 160
        assert seen.masked_input_bytes[site] < seen.upload_bytes[site] < 4 * 100 + 4096


def test_fast_context_encoding_and_derivation_match_the_crypto_recipes() -> None:
    from fedhealth.crypto import derive_key
    from fedhealth.secagg._crypto_extra import context_json, derive

    contexts = [
        {"purpose": "secagg-pairwise-mask", "study": "étude", "round": 3, "pair": ["site-00", "site-01"]},
        {"purpose": "x", "protocol": "fedhealth-secagg+/1", "config_digest": "ab" * 32, "site": "site-9"},
    ]
    for context in contexts:
        assert context_json(context) == canonical_json(context)
        assert derive(b"\x01" * 32, context) == derive_key(b"\x01" * 32, context)
    with pytest.raises(ValueError):
        derive(b"\x01" * 32, {"study": "s"})


def test_signed_advertisement_payload_verifies_with_the_crypto_recipe() -> None:
    from fedhealth.crypto import verify_json

    fed = make_federation(2, 2)
    advert = fed.clients["site-00"].advertise_keys()
    from fedhealth.secagg._derive import advertisement_payload

    payload = advertisement_payload(
        fed.config, fed.config.digest(), "site-00", advert.cipher_public_key, advert.mask_public_key
    )
    verify_json(fed.publics["site-00"], advert.signature, payload)  # raises if the bytes differed
