"""Session credentials: unguessable, bound to their service and anchor, expiring, checked without state."""

import pytest
from cloudlet.protocol import credentials
from cloudlet.protocol.credentials import CredentialError, Refusal

SECRET = b"0123456789abcdef-secret"


def test_issue_then_verify() -> None:
    cred = credentials.issue(SECRET, "redis", "edge-1", now=1000)
    got = credentials.verify(SECRET, cred.token, "redis", 3600, now=2000)
    assert got == cred and got.session_id == cred.nonce and got.anchor == "edge-1"
    assert cred.token.startswith("v2.redis.edge-1..1000.")
    assert credentials.anchor_of(cred.token) == "edge-1" and credentials.anchor_of("garbage") is None
    assert len(cred.token) <= credentials.MAX_CREDENTIAL_LEN


def test_nonces_are_unique() -> None:
    assert len({credentials.issue(SECRET, "s", "edge-1").nonce for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # MAC changed
        lambda t: t.replace("v2.", "v1.", 1),
        lambda t: t.replace(".edge-1.", ".edge-2.", 1),  # anchor changed: MAC no longer matches
        lambda t: t.replace(".redis.", ".other.", 1),  # service changed: MAC no longer matches
        lambda t: "garbage",
        lambda t: t + ".extra",
        lambda t: "x" * 500,
    ],
)
def test_tampered_tokens_are_bad(mutate) -> None:  # type: ignore[no-untyped-def]
    token = credentials.issue(SECRET, "redis", "edge-1").token
    with pytest.raises(CredentialError) as err:
        credentials.verify(SECRET, mutate(token), None, 3600)
    assert err.value.reason == Refusal.BAD_CREDENTIAL


def test_other_fleet_secret_is_bad() -> None:
    token = credentials.issue(b"another-fleet-secret!!", "redis", "edge-1").token
    with pytest.raises(CredentialError) as err:
        credentials.parse(SECRET, token)
    assert err.value.reason == Refusal.BAD_CREDENTIAL


def test_wrong_service_and_expired() -> None:
    token = credentials.issue(SECRET, "redis", "edge-1", now=1000).token
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


def test_bad_service_or_anchor_name_cannot_be_issued() -> None:
    with pytest.raises(ValueError, match="service"):
        credentials.issue(SECRET, "Bad.Name", "edge-1")
    with pytest.raises(ValueError, match="anchor"):
        credentials.issue(SECRET, "redis", "Edge.1")


def test_v1_credentials_are_refused_with_a_clear_message() -> None:
    with pytest.raises(CredentialError, match="v1 credential .no anchor."):
        credentials.parse(SECRET, "v1.redis.1000.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA")
