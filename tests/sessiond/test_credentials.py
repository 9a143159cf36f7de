"""Session credentials: unguessable, bound to their service, expiring, checked without state."""

import pytest
from cloudlet.protocol import credentials
from cloudlet.protocol.credentials import CredentialError, Refusal

SECRET = b"0123456789abcdef-secret"


def test_issue_then_verify() -> None:
    cred = credentials.issue(SECRET, "redis", now=1000)
    got = credentials.verify(SECRET, cred.token, "redis", 3600, now=2000)
    assert got == cred and got.session_id == cred.nonce
    assert cred.token.startswith("v1.redis.1000.")
    assert len(cred.token) <= credentials.MAX_CREDENTIAL_LEN


def test_nonces_are_unique() -> None:
    assert len({credentials.issue(SECRET, "s").nonce for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # MAC changed
        lambda t: t.replace("v1.", "v2.", 1),
        lambda t: t.replace(".redis.", ".other.", 1),  # service changed: MAC no longer matches
        lambda t: "garbage",
        lambda t: t + ".extra",
        lambda t: "x" * 500,
    ],
)
def test_tampered_tokens_are_bad(mutate) -> None:  # type: ignore[no-untyped-def]
    token = credentials.issue(SECRET, "redis").token
    with pytest.raises(CredentialError) as err:
        credentials.verify(SECRET, mutate(token), None, 3600)
    assert err.value.reason == Refusal.BAD_CREDENTIAL


def test_other_fleet_secret_is_bad() -> None:
    token = credentials.issue(b"another-fleet-secret!!", "redis").token
    with pytest.raises(CredentialError) as err:
        credentials.parse(SECRET, token)
    assert err.value.reason == Refusal.BAD_CREDENTIAL


def test_wrong_service_and_expired() -> None:
    token = credentials.issue(SECRET, "redis", now=1000).token
    with pytest.raises(CredentialError) as err:
        credentials.verify(SECRET, token, "web", 3600, now=1001)
    assert err.value.reason == Refusal.WRONG_SERVICE
    with pytest.raises(CredentialError) as err:
        credentials.verify(SECRET, token, "redis", 3600, now=1000 + 3601)
    assert err.value.reason == Refusal.EXPIRED


def test_short_secret_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "s"
    p.write_bytes(b"short\n")
    with pytest.raises(ValueError, match="too short"):
        credentials.load_secret(p)
    p.write_bytes(b"a-long-enough-secret-value\n")
    assert credentials.load_secret(p) == b"a-long-enough-secret-value"


def test_bad_service_name_cannot_be_issued() -> None:
    with pytest.raises(ValueError):
        credentials.issue(SECRET, "Bad.Name")
