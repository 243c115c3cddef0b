"""The one wire-error codec: what servers encode, every client decodes, whatever a newer worker sends."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import (
    ErrorCode,
    IngressError,
    Overloaded,
    RemoteError,
    ShuttingDown,
    decode_error,
    encode_error,
    remote_error,
)
from runtime._errors import ERROR_CLASSES


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_round_trips_with_its_own_class(code):
    """Encoded by a server and decoded by a client, an error keeps code, message, retryable and class."""
    sent = ERROR_CLASSES[code]("naïve ☃ message")
    received = decode_error(encode_error(sent, True))
    assert (received.code, received.message, received.retryable) == (code, sent.message, True)
    assert isinstance(received, RemoteError) and isinstance(received, ERROR_CLASSES[code])


def test_a_client_can_catch_a_remote_error_by_its_code_class():
    """`except Overloaded` catches what a worker answered OVERLOADED, on the client side too."""
    with pytest.raises(Overloaded):
        raise remote_error(int(ErrorCode.OVERLOADED), "queue full", retryable=True)
    assert not isinstance(remote_error("OVERLOADED", "x", retryable=True), ShuttingDown)


@pytest.mark.parametrize("code", [99, "TEAPOT", -1])
@pytest.mark.parametrize("retryable", [True, False])
def test_an_unknown_code_is_a_generic_error_that_keeps_retryable(code, retryable):
    """A code from a newer worker decodes to INTERNAL naming the code, never a KeyError; retryable kept."""
    error = remote_error(code, "new kind of failure", retryable=retryable)
    assert error.code is ErrorCode.INTERNAL and error.retryable is retryable
    assert repr(code) in error.message and "new kind of failure" in error.message


def test_json_true_is_not_mistaken_for_code_1():
    """A body whose code is `true` is unknown, not BAD_REQUEST (bool is an int in Python)."""
    assert decode_error(b'{"code": true, "message": "m", "retryable": false}').message.startswith("unknown")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_any_json_body_decodes_to_an_error_and_never_raises(body):
    """Whatever JSON arrives as an error body, the client gets an IngressError, never its own exception."""
    error = decode_error(json.dumps(body).encode())
    assert isinstance(error, IngressError) and isinstance(error.retryable, bool)


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_an_error_and_never_raise(data):
    """Bytes that are not JSON at all still give an error that says so."""
    error = decode_error(data)
    assert isinstance(error, RemoteError) and isinstance(error.retryable, bool)
