"""CHAP secrets: never shown in a repr, message or log; validation of credentials and policies; generated
secrets; and loading a secret from a literal or a file (which must not be readable by others)."""
from __future__ import annotations

import logging
import os

import pytest

from chap_helpers import SECRET, TSECRET, TUSER, USER, Initiator, assert_clean, authenticator, negotiator, policy
from trioscsi.iscsi.chap import (MIN_SECRET_LENGTH, ChapCredentials, ChapPolicy, describe_policy, generate_secret,
                                 load_secret)


# ------------------------------------------------------------------------------------------------ secrets

def test_credentials_and_policy_never_show_secrets(caplog: pytest.LogCaptureFixture) -> None:
    pol = policy(mutual=True)
    auth = authenticator(pol)
    Initiator(target_user=TUSER).login(negotiator(auth))
    for shown in (repr(pol), str(pol), repr(pol.incoming), str(pol.outgoing), describe_policy(pol), repr(auth),
                  str(auth), pol.describe()):
        assert_clean(shown)
        assert "***" in shown or "ChapAuthenticator" in shown
    assert describe_policy(None) == describe_policy(ChapPolicy(None)) == "no authentication"
    assert "SHA3-256" in pol.describe() and TUSER in pol.describe()
    with caplog.at_level(logging.WARNING):
        weak = ChapCredentials("bob", b"short")
    assert weak.weak and "bob" in caplog.text and "short" not in caplog.text.replace("shorter", "")
    assert "weak" in ChapPolicy(weak).describe()


def test_credentials_validation() -> None:
    for user, secret in [("", SECRET), ("a\0b", SECRET), ("x" * 256, SECRET), ("u", b""), ("u", b"a\0b")]:
        with pytest.raises(ValueError) as info:
            ChapCredentials(user, secret)
        assert_clean(str(info.value))
    with pytest.raises(TypeError):
        ChapCredentials("u", "text-secret-123")  # type: ignore[arg-type]


def test_policy_validation() -> None:
    with pytest.raises(ValueError) as info:    # RFC 7143 12.1.3: never the same secret in both directions
        ChapPolicy(ChapCredentials(USER, SECRET), ChapCredentials(TUSER, SECRET))
    assert_clean(str(info.value))
    with pytest.raises(ValueError):
        ChapPolicy(None, ChapCredentials(TUSER, TSECRET))
    for algorithms in [(), (4,), (5, 5), (9,)]:
        with pytest.raises(ValueError):
            ChapPolicy(ChapCredentials(USER, SECRET), algorithms=algorithms)
    assert policy().auth_methods == ("CHAP",) and ChapPolicy(None).auth_methods == ("None",)
    assert policy().required and not ChapPolicy(None).required


def test_generate_secret() -> None:
    secrets = {generate_secret() for _ in range(20)}
    assert len(secrets) == 20 and all(len(s) >= 22 for s in secrets)
    assert not ChapCredentials("u", load_secret(generate_secret())).weak and MIN_SECRET_LENGTH == 12


def write(path: os.PathLike[str], content: bytes, mode: int) -> str:
    with open(path, "wb") as file:
        file.write(content)
    os.chmod(path, mode)
    return os.fspath(path)


def test_load_secret_literal_and_file(tmp_path: os.PathLike[str]) -> None:
    assert load_secret("plain-secret-123") == b"plain-secret-123"
    assert load_secret(b"raw\xffbytes") == b"raw\xffbytes"
    path = write(tmp_path / "s", b"from-a-file-123\n", 0o600)       # type: ignore[operator]
    assert load_secret("file:" + path) == b"from-a-file-123"
    path = write(tmp_path / "crlf", b"windows-secret\r\n", 0o400)   # type: ignore[operator]
    assert load_secret("file:" + path) == b"windows-secret"
    path = write(tmp_path / "two", b"keeps-one\n\n", 0o600)         # type: ignore[operator]
    assert load_secret("file:" + path) == b"keeps-one\n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660, 0o610])
def test_load_secret_refuses_shared_files(tmp_path: os.PathLike[str], mode: int) -> None:
    path = write(tmp_path / "shared", b"do-not-print-me", mode)     # type: ignore[operator]
    with pytest.raises(ValueError) as info:
        load_secret("file:" + path)
    assert path in str(info.value) and "do-not-print-me" not in str(info.value)


def test_load_secret_errors_name_the_file(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(os.fspath(tmp_path), "missing")
    empty = write(tmp_path / "empty", b"\n", 0o600)                 # type: ignore[operator]
    big = write(tmp_path / "big", b"x" * 5000, 0o600)               # type: ignore[operator]
    for path in (missing, empty, big, os.fspath(tmp_path)):
        with pytest.raises(ValueError) as info:
            load_secret("file:" + path)
        assert path in str(info.value) and "xxxx" not in str(info.value)
    for empty_value in ("", b""):
        with pytest.raises(ValueError):
            load_secret(empty_value)
