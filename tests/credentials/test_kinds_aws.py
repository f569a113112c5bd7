"""AWS STS and SigV4 protocol pieces as values: session names, the STS form and answers,
config validation, the (service, region) derived from endpoint hosts."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sidecar import config
from sidecar.credentials import aws_sts
from sidecar.errors import ConfigError, Scrubber, TokenRejected, TokenUnavailable
from sidecar.ops.checks import check_config, summary

ROLE = "arn:aws:iam::123456789012:role/app"
OK = b"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>spiffe://example.org/app</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/app/example.org-app</Arn>
      <AssumedRoleId>AROAEXAMPLE:example.org-app</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
      <SecretAccessKey>secret/KEY+example</SecretAccessKey>
      <SessionToken>FwoGZXIvYXdzEXAMPLE=</SessionToken>
      <Expiration>2026-12-02T07:00:00Z</Expiration>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>"""
WALL = 1_796_191_200.0  # 2026-12-02T06:00:00Z


@pytest.mark.parametrize(
    ("spiffe_id", "name"),
    [
        ("spiffe://example.org/ns/default/sa/app", "example.org-ns-default-sa-app"),
        ("spiffe://example.org/a b/ü/{x}", "example.org-a-b----x"),
        ("spiffe://e/x", "e-x"),
        ("spiffe://x", "x-"),
    ],
)
def test_session_names_follow_iam_rules(spiffe_id: str, name: str) -> None:
    assert aws_sts.session_name(spiffe_id) == name
    assert re.fullmatch(r"[\w+=,.@-]{2,64}", name, re.ASCII)


def test_long_spiffe_ids_keep_distinct_session_names() -> None:
    base = "spiffe://example.org/" + "team/" * 20
    one, two = aws_sts.session_name(base + "a"), aws_sts.session_name(base + "b")
    assert len(one) == len(two) == 64
    assert one != two
    assert one.startswith("example.org-team-team")


def _server(**extra: Any) -> config.AuthorizationServer:
    doc: dict[str, Any] = {
        "spiffe": {"socket": "unix:///tmp/agent.sock"},
        "authorization_servers": {"aws": {"kind": "aws_sts", "region": "eu-west-1", **extra}},
        "destinations": [
            {
                "host": "s3.eu-west-1.amazonaws.com",
                "credential": "aws_sigv4",
                "authorization_server": "aws",
            }
        ],
    }
    return config.parse(doc).authorization_servers["aws"]


def test_the_sts_form_carries_the_svid_role_session_and_duration() -> None:
    server = _server(role_arn=ROLE, duration=900)
    assert server.token_endpoint == "https://sts.eu-west-1.amazonaws.com/"
    assert server.jwt_svid_audience == "sts.amazonaws.com"
    form = aws_sts.assume_role_form(server, "eyJ.svid.sig", "spiffe://example.org/app")
    assert form == {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": "2011-06-15",
        "RoleArn": ROLE,
        "RoleSessionName": "example.org-app",
        "WebIdentityToken": "eyJ.svid.sig",
        "DurationSeconds": "900",
    }
    named = _server(role_arn=ROLE, session_name="billing@prod", svid_audience="aws")
    assert aws_sts.assume_role_form(named, "t", "spiffe://x/y")["RoleSessionName"] == (
        "billing@prod"
    )
    assert named.jwt_svid_audience == "aws"


def test_an_sts_answer_becomes_session_credentials() -> None:
    session = aws_sts.parse_response(200, OK, route="s3", now=100.0, wall=WALL)
    assert session.access_key_id == "ASIAEXAMPLE"
    assert session.secret_key.reveal() == "secret/KEY+example"
    assert session.value.reveal() == "FwoGZXIvYXdzEXAMPLE="
    assert session.expires_at == 100.0 + 3600
    assert session.claims["sub"] == "arn:aws:sts::123456789012:assumed-role/app/example.org-app"
    assert "secret/KEY+example" not in repr(session)


@pytest.mark.parametrize(
    ("status", "body", "error", "summary"),
    [
        (
            403,
            b"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>"
            b"<Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message>"
            b"</Error></ErrorResponse>",
            TokenRejected,
            "AccessDenied",
        ),
        (
            400,
            b'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
            b"<Code>InvalidIdentityToken</Code><Message>bad aud</Message></Error></ErrorResponse>",
            TokenRejected,
            "InvalidIdentityToken",
        ),
        (
            400,
            b"<ErrorResponse><Error><Code>IDPCommunicationError</Code></Error></ErrorResponse>",
            TokenUnavailable,
            "IDPCommunicationError",
        ),
        (
            403,
            b"<ErrorResponse><Error><Code>Made&lt;Up</Code></Error></ErrorResponse>",
            TokenRejected,
            "unknown",  # not a documented code: the peer's text is not shown
        ),
        (503, b"<html>down</html>", TokenUnavailable, "unknown"),
        (500, b"not xml", TokenUnavailable, "unknown"),
    ],
)
def test_sts_errors_are_classified(
    status: int, body: bytes, error: type[Exception], summary: str
) -> None:
    with pytest.raises(error) as info:
        aws_sts.parse_response(status, body, route="s3", now=0.0, wall=WALL)
    assert getattr(info.value, "upstream_error", None) == summary


def test_stss_message_is_kept_for_the_log_without_what_was_sent() -> None:
    svid = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy9hcHAifQ.c2lnbmF0dXJl"
    body = (
        "<ErrorResponse><Error><Code>InvalidIdentityToken</Code><Message>Token "
        f"{svid} has the wrong audience</Message></Error></ErrorResponse>"
    ).encode()
    with pytest.raises(TokenRejected) as info:
        aws_sts.parse_response(400, body, route="s3", now=0.0, wall=WALL, scrub=Scrubber([svid]))
    assert info.value.upstream_error == "InvalidIdentityToken"
    assert info.value.peer_text is not None
    assert info.value.peer_text.startswith("Token ")
    assert "wrong audience" in info.value.peer_text
    assert svid[20:40] not in info.value.peer_text
    assert "wrong audience" not in json.dumps(info.value.body())


@pytest.mark.parametrize(
    "body",
    [
        b"not xml at all",
        b"<AssumeRoleWithWebIdentityResponse/>",
        OK.replace(b"<SessionToken>FwoGZXIvYXdzEXAMPLE=</SessionToken>", b""),
        OK.replace(b"FwoGZXIvYXdzEXAMPLE=", b"Fwo\r\nX-Evil: 1"),
        OK.replace(b"secret/KEY+example", b"secret key"),
        OK.replace(b"2026-12-02T07:00:00Z", b"tomorrow"),
    ],
)
def test_an_incomplete_or_unsafe_answer_is_refused(body: bytes) -> None:
    with pytest.raises(TokenRejected):
        aws_sts.parse_response(200, body, route="s3", now=0.0, wall=WALL)


def test_an_expired_answer_has_no_lifetime_left() -> None:
    session = aws_sts.parse_response(200, OK, route="s3", now=0.0, wall=WALL + 7200)
    assert not session.usable(0.0)


@pytest.mark.parametrize(
    ("host", "scope"),
    [
        ("s3.eu-west-1.amazonaws.com", ("s3", "eu-west-1")),
        ("bucket.s3.us-west-2.amazonaws.com", ("s3", "us-west-2")),
        ("*.s3.ap-south-1.amazonaws.com", ("s3", "ap-south-1")),
        ("s3.amazonaws.com", ("s3", "us-east-1")),
        ("sqs.us-east-1.amazonaws.com", ("sqs", "us-east-1")),
        ("bucket.s3-fips.us-east-2.amazonaws.com", ("s3", "us-east-2")),
        ("iam.amazonaws.com", ("iam", "us-east-1")),
        ("api.example.com", None),
        ("amazonaws.com", None),
        ("foo.amazonaws.com", None),
    ],
)
def test_service_and_region_from_endpoint_hosts(host: str, scope: Any) -> None:
    assert config.aws_scope(host) == scope


def test_every_aws_config_problem_is_reported_with_its_path() -> None:
    doc = {
        "spiffe": {"socket": "unix:///tmp/agent.sock"},
        "authorization_servers": {
            "aws": {
                "kind": "aws_sts",
                "role_arn": "arn:aws:iam::12:user/x",
                "session_name": "no spaces allowed",
                "duration": 60,
                "grant": "client_credentials",
            },
            "oauth": {"issuer": "https://as.example", "role_arn": ROLE},
        },
        "destinations": [
            {"host": "api.example.com", "credential": "aws_sigv4", "authorization_server": "aws"},
            {
                "host": "s3.amazonaws.com",
                "credential": "aws_sigv4",
                "authorization_server": "oauth",
            },
            {"host": "x.example", "authorization_server": "aws"},
            {
                "host": "y.example",
                "credential": "aws_sigv4",
                "authorization_server": "aws",
                "aws": {"service": "S3!", "region": "mars"},
                "scopes": {"default": ["a"]},
            },
        ],
    }
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    text = str(info.value)
    for expected in (
        "authorization_servers.aws.region: is required",
        "authorization_servers.aws.role_arn: must be an IAM role ARN",
        "authorization_servers.aws.session_name: must match",
        "authorization_servers.aws.duration: must be an integer from 900 to 43200",
        "authorization_servers.aws.grant: is not used with kind: aws_sts",
        "authorization_servers.oauth.role_arn: is only used with kind: aws_sts",
        "destinations[0].aws: cannot derive the signing service and region",
        "destinations[1].authorization_server: 'oauth' is a oauth server; credential aws_sigv4",
        "destinations[2].authorization_server: 'aws' is a aws_sts server; credential dpop",
        "destinations[3].aws.service: must be an AWS service name",
        "destinations[3].aws.region: must be an AWS region",
        "destinations[3].scopes: is for OAuth routes",
    ):
        assert expected in text, text


def test_check_summarises_every_kind_without_secrets(tmp_path: Any) -> None:
    key = tmp_path / "key"
    key.write_text("sk-test-secret-value")
    doc = {
        "spiffe": {"socket": "unix:///tmp/agent.sock"},
        "authorization_servers": {
            "aws": {"kind": "aws_sts", "region": "eu-west-1", "role_arn": ROLE},
            "gcp": {
                "kind": "google_sts",
                "provider": "//iam.googleapis.com/projects/1/locations/global/"
                "workloadIdentityPools/pool/providers/spire",
                "service_account": "app-runner@proj-1.iam.gserviceaccount.com",
            },
            "unused": {"kind": "aws_sts", "region": "eu-west-1", "role_arn": ROLE},
        },
        "destinations": [
            {"host": "s3.eu-west-1.amazonaws.com", "credential": "aws_sigv4",
             "authorization_server": "aws"},
            {"host": "storage.googleapis.com", "authorization_server": "gcp",
             "token_type": "bearer", "scopes": {"default": ["x"]}},
            {"host": "api.vendor.example", "credential": "header",
             "headers": [{"name": "X-Api-Key", "file": str(key)}]},
        ],
    }  # fmt: skip
    cfg = config.parse(doc, source=tmp_path / "sidecar.yaml")
    text = summary(cfg)
    assert f"aws_sigv4 (service s3, region eu-west-1) via aws (aws_sts, role {ROLE})" in text
    assert "via gcp (google_sts, as app-runner@proj-1.iam.gserviceaccount.com, bearer)" in text
    assert "header X-Api-Key (from files)" in text
    assert "sk-test-secret-value" not in text
    assert check_config(cfg) == ["authorization_servers.unused: not used by any destination"]
