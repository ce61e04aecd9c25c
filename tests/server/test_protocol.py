"""The wire protocol's codec: round trips, signatures over every frame, replay and version refusal, limits, and
Hypothesis fuzzing: every input either decodes or raises the protocol's own error."""

from __future__ import annotations

import json
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holofusion.server.protocol import (DELIMITER, ERROR_CODES, Limits, Message, ProtocolError, ReplayGuard, Signer,
                                        decode, encode, frame_digests, pack_array, unpack_array)

KEY = "k" * 64


def _generate(**overrides) -> Message:
    content = {"model": "apple", "category": None, "seed": 7, "preset": "draft", "count": 1, "options": {},
               "request_id": "r1"}
    content.update(overrides)
    return Message("generate", content)


def test_round_trip_with_array_buffers():
    signer = Signer(KEY)
    desc, raw = pack_array("positions", struct.pack("<6f", *range(6)), "float32", [2, 3])
    msg = Message("result", {"job_id": "j", "index": 0, "seed": 3, "metadata": {"faces": 1}, "buffers": [desc]},
                  [raw])
    frames = encode(msg, signer, "server", 1, job_id="j")
    got = decode(frames, signer, ReplayGuard())
    assert got.msg_type == "result" and got.content["metadata"] == {"faces": 1} and got.header["job_id"] == "j"
    values, shape = unpack_array(*got.buffer("positions"))
    assert shape == [2, 3] and list(values) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def _reference_signature(key: str, frames: list[bytes]) -> bytes:
    """The signature as docs/PROTOCOL.md writes it out, independently of protocol.py."""
    import hashlib
    import hmac

    def digest(frame: bytes, chunk: int = 1 << 19) -> bytes:
        if len(frame) <= chunk:
            return hashlib.sha256(frame).digest()
        return hashlib.sha256(b"".join(hashlib.sha256(frame[i:i + chunk]).digest()
                                       for i in range(0, len(frame), chunk))).digest()

    mac = hmac.new(key.encode(), digestmod=hashlib.sha256)
    for f in frames:
        mac.update(struct.pack(">Q", len(f)) + digest(f))
    return mac.hexdigest().encode("ascii")


def test_large_buffers_are_signed_in_chunks_as_the_specification_says():
    signer = Signer(KEY)
    big = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB + 1792 bytes: six full 512 KiB pieces and a short one
    count = len(big) // 12
    desc, raw = pack_array("faces", big[:12 * count], "uint32", [count, 3])
    assert len(raw) > 6 * (1 << 19)
    msg = Message("result", {"job_id": "j", "index": 0, "seed": 3, "metadata": {}, "buffers": [desc]}, [raw])
    frames = encode(msg, signer, "s", 1)
    assert frames[1] == _reference_signature(KEY, frames[2:])
    small = encode(Message("ping"), signer, "s", 2)
    assert small[1] == _reference_signature(KEY, small[2:])
    decode(frames, signer)
    for at in (5, (1 << 19) + 11, len(raw) - 1):  # a flipped bit in the first, a middle and the last piece
        bad = list(frames)
        b = bytearray(bad[4])
        b[at] ^= 1
        bad[4] = bytes(b)
        with pytest.raises(ProtocolError) as e:
            decode(bad, signer)
        assert e.value.code == "bad_signature"
    # Moving bytes from one frame to the next (same concatenation) breaks it too.
    moved = list(frames[:4]) + [frames[4][:-4]] + [frames[4][-4:]]
    with pytest.raises(ProtocolError):
        decode(moved, signer)


def test_digests_computed_ahead_and_zero_copy_buffers_sign_and_decode_the_same():
    """A message sent many times (a stored result) carries its buffers' digests: the signature is the specification's
    all the same, and a receiver that keeps large frames as memoryviews (ZeroMQ's own memory) decodes them unchanged."""
    signer = Signer(KEY)
    big = bytes(range(256)) * 8196  # 2 MiB + 1 KiB: four pieces and a short one, 12-byte rows
    desc, raw = pack_array("faces", memoryview(big), "uint32", [len(big) // 12, 3])
    assert isinstance(raw, memoryview) and raw.obj is big  # a view, not a copy
    msg = Message("result", {"job_id": "j", "index": 0, "seed": 3, "metadata": {}, "buffers": [desc]}, [raw])
    msg.digests = frame_digests(msg.buffers)
    frames = encode(msg, signer, "s", 1)
    assert frames[1] == _reference_signature(KEY, [bytes(f) for f in frames[2:]])
    received = [bytes(f) for f in frames[:4]] + [memoryview(bytes(frames[4]))]
    got = decode(received, signer)
    assert isinstance(got.buffers[0], memoryview) and got.buffers[0] == big
    # A digest that is not the buffer's gives a signature the receiver refuses: a stale one cannot pass unnoticed.
    msg.digests = [bytes(32)]
    with pytest.raises(ProtocolError) as e:
        decode(encode(msg, signer, "s", 2), signer)
    assert e.value.code == "bad_signature"


def test_every_frame_is_signed():
    signer = Signer(KEY)
    desc, raw = pack_array("faces", struct.pack("<3I", 0, 1, 2), "uint32", [1, 3])
    frames = encode(Message("result", {"job_id": "j", "index": 0, "seed": 3, "metadata": {}, "buffers": [desc]},
                            [raw]), signer, "s", 1)
    for i in range(2, len(frames)):
        bad = list(frames)
        bad[i] = bad[i][:-1] + bytes([bad[i][-1] ^ 1])
        with pytest.raises(ProtocolError) as e:
            decode(bad, signer)
        assert e.value.code == "bad_signature"
    with pytest.raises(ProtocolError, match="unsigned") as e:
        decode([frames[0], b""] + frames[2:], signer)
    with pytest.raises(ProtocolError) as e:
        decode(frames, Signer("another key"))
    assert e.value.code == "bad_signature"


def test_replays_and_old_sequence_numbers_are_refused():
    signer, guard = Signer(KEY), ReplayGuard()
    first = encode(Message("ping"), signer, "c", 1)
    decode(first, signer, guard)
    with pytest.raises(ProtocolError) as e:
        decode(first, signer, guard)
    assert e.value.code == "replayed"
    with pytest.raises(ProtocolError, match="not above") as e:
        decode(encode(Message("ping"), signer, "c", 1), signer, guard)
    decode(encode(Message("ping"), signer, "c", 2), signer, guard)
    decode(encode(Message("hello", {"client": "blender"}), signer, "c", 1), signer, guard)  # a new session
    stale = encode(Message("ping"), signer, "d", 1)
    with pytest.raises(ProtocolError, match="stamped") as e:
        decode(stale, signer, ReplayGuard(), now=time.time() + 3600)
    assert e.value.code == "replayed"


def test_wrong_version_is_refused():
    signer = Signer(KEY)
    frames = encode(Message("ping"), signer, "c", 1)
    header = json.loads(frames[2])
    header["version"] = "3.0"
    body = [json.dumps(header).encode(), frames[3]]
    with pytest.raises(ProtocolError) as e:
        decode([DELIMITER, signer.sign(body)] + body, signer)
    assert e.value.code == "version"
    with pytest.raises(ProtocolError) as e:
        decode([b"<HOLOFUSION|1>"] + frames[1:], signer)
    assert e.value.code == "version"


def test_limits():
    signer = Signer(KEY)
    frames = encode(Message("ping"), signer, "c", 1)
    with pytest.raises(ProtocolError) as e:
        decode(frames + [b"x"] * 100, signer)
    assert e.value.code == "too_large"
    with pytest.raises(ProtocolError) as e:
        decode(frames, signer, limits=Limits(max_message_bytes=64))
    assert e.value.code == "too_large"
    with pytest.raises(ProtocolError) as e:
        decode(frames[:3], signer)  # truncated
    assert e.value.code == "malformed"


@pytest.mark.parametrize("field, value, words", [("seed", -1, "out of range"), ("seed", 2**31, "out of range"),
                                                 ("count", 0, "out of range"), ("preset", 3, "must be str"),
                                                 ("seed", True, "must be int"), ("request_id", None, "must be str")])
def test_request_fields_are_validated(field, value, words):
    with pytest.raises(ProtocolError, match=words) as e:
        encode(_generate(**{field: value}), Signer(KEY), "c", 1)
    assert e.value.code == "invalid_request"


def test_unknown_type_and_codes():
    with pytest.raises(ProtocolError) as e:
        encode(Message("launch_missiles"), Signer(KEY), "c", 1)
    assert e.value.code == "unknown_type"
    with pytest.raises(ValueError):
        ProtocolError("no_such_code", "x")
    assert all(isinstance(v, str) and v for v in ERROR_CODES.values())


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_frames_decode_or_raise_a_protocol_error(frames):
    try:
        decode(frames, Signer(KEY), ReplayGuard())
    except ProtocolError as e:
        assert e.code in ERROR_CODES


_SIGNER = Signer(KEY)
_VALID = encode(_generate(), _SIGNER, "c", 1)  # one fixed message: Hypothesis needs the same frames every run
_STAMP = json.loads(_VALID[2])["time"]


@settings(max_examples=3000, deadline=None)
@given(st.data())
def test_mutated_valid_frames_decode_or_raise_a_protocol_error(data):
    signer = _SIGNER
    frames = list(_VALID)
    i = data.draw(st.integers(0, len(frames) - 1))
    mutation = data.draw(st.sampled_from(["flip", "cut", "extend", "drop", "dup"]))
    frames = list(frames)
    if mutation == "flip" and frames[i]:
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i] = frames[i][:j] + bytes([frames[i][j] ^ data.draw(st.integers(1, 255))]) + frames[i][j + 1:]
    elif mutation == "cut":
        frames[i] = frames[i][:data.draw(st.integers(0, len(frames[i])))]
    elif mutation == "extend":
        frames[i] = frames[i] + data.draw(st.binary(min_size=1, max_size=50))
    elif mutation == "drop":
        del frames[i]
    else:
        frames.insert(i, frames[i])
    try:
        decode(frames, signer, ReplayGuard(), now=_STAMP)
    except ProtocolError as e:
        assert e.code in ERROR_CODES


@settings(max_examples=500, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_signed_but_arbitrary_json_is_refused_cleanly(value):
    """A peer with the key can still send nonsense: it must be refused, never crash the decoder."""
    signer = Signer(KEY)
    body = [json.dumps({"msg_id": "a", "msg_type": "generate", "version": "2.0", "client_id": "c", "seq": 1,
                        "time": time.time()}).encode(), json.dumps(value).encode()]
    try:
        decode([DELIMITER, signer.sign(body)] + body, signer)
    except ProtocolError as e:
        assert e.code in ERROR_CODES
