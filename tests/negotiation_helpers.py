"""Shared by the text negotiation tests (test_iscsi_negotiation.py, test_iscsi_text.py): `fails_with`, which
expects a NegotiationError with a given login status, and a hypothesis strategy for key names."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import strategies as st

from trioscsi.iscsi.negotiation import LoginStatus, NegotiationError


@contextmanager
def fails_with(status: LoginStatus) -> Iterator[None]:
    with pytest.raises(NegotiationError) as info:
        yield
    assert info.value.status == status, info.value


_key_name = st.from_regex(r"[A-Za-z0-9.+@_:#-]{1,63}", fullmatch=True)   # anything parse_text lets through
