"""Routing: target parsing, host matching, and the scope-rule precedence (table-driven)."""

import pytest

from sidecar import config
from sidecar.errors import BadRequest, NoScopeRule, NotAProxyRequest, UnknownDestination
from sidecar.routing import RoutingTable, parse_target

ENV = {"SPIFFE_ENDPOINT_SOCKET": "unix:///s.sock"}


def table(rules: list[dict[str, object]], default: list[str] | None = None) -> RoutingTable:
    scopes: dict[str, object] = {"rules": rules}
    if default is not None:
        scopes["default"] = default
    doc = {
        "authorization_servers": {"as": {"token_endpoint": "https://as.example/token"}},
        "destinations": [
            {"host": "api.example", "authorization_server": "as", "scopes": scopes},
            {"host": "*.wild.example", "authorization_server": "as", "scopes": {"default": ["w"]}},
        ],
    }
    return RoutingTable(config.parse(doc, env=ENV))


RULES = [
    {"paths": ["/v1/**"], "scopes": ["v1:any"]},
    {"methods": ["GET"], "paths": ["/v1/invoices/**"], "scopes": ["invoices:read"]},
    {"methods": ["POST", "PUT"], "paths": ["/v1/invoices/**"], "scopes": ["invoices:write"]},
    {"paths": ["/v1/invoices/*/pdf"], "scopes": ["invoices:pdf"]},
    {"methods": ["DELETE"], "paths": ["/v1/invoices/*"], "scopes": ["invoices:delete", "audit"]},
    {"paths": ["/v1/invoices/*/pdf"], "methods": ["GET"], "scopes": ["pdf:get"]},
]


@pytest.mark.parametrize(
    ("method", "path", "scopes"),
    [
        ("GET", "/v1/invoices", ("invoices:read",)),  # '**' matches zero segments
        ("GET", "/v1/invoices/42", ("invoices:read",)),
        ("POST", "/v1/invoices/42/lines", ("invoices:write",)),
        ("PATCH", "/v1/invoices/42", ("v1:any",)),  # no method-specific rule: the generic one
        ("GET", "/v1/invoices/42/pdf", ("pdf:get",)),  # same paths: listing methods wins
        ("HEAD", "/v1/invoices/42/pdf", ("invoices:pdf",)),  # more literal segments win
        ("DELETE", "/v1/invoices/42", ("audit", "invoices:delete")),  # sorted
        ("GET", "/v2/other", ("fallback",)),  # default
        ("GET", "/v1", ("v1:any",)),
    ],
)
def test_scope_rules_pick_the_most_specific(
    method: str, path: str, scopes: tuple[str, ...]
) -> None:
    resolved = table(RULES, ["fallback"]).resolve(method, f"http://api.example{path}")
    assert resolved.scopes == scopes


def test_equal_specificity_goes_to_the_earlier_rule() -> None:
    rules = [{"paths": ["/a/*"], "scopes": ["first"]}, {"paths": ["/a/*"], "scopes": ["second"]}]
    assert table(rules).resolve("GET", "http://api.example/a/b").scopes == ("first",)


def test_no_rule_and_no_default_is_refused_naming_the_route() -> None:
    with pytest.raises(NoScopeRule) as info:
        table(RULES).resolve("GET", "http://api.example/v2/x")
    assert info.value.route == "api.example"
    assert info.value.status == 403


@pytest.mark.parametrize(
    ("host", "routed"),
    [
        ("api.example", True),
        ("API.Example", True),
        ("eu.wild.example", True),
        ("wild.example", False),
        ("a.eu.wild.example", False),
        ("evil.example", False),
        ("api.example.evil", False),
    ],
)
def test_host_matching(host: str, routed: bool) -> None:
    t = table([], ["s"])
    if routed:
        assert t.resolve("GET", f"http://{host}/").route
    else:
        with pytest.raises(UnknownDestination):
            t.resolve("GET", f"http://{host}/")


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("/v1/x", NotAProxyRequest),
        ("ftp://api.example/", BadRequest),
        ("https://api.example/", BadRequest),
        ("http://user:pw@api.example/", BadRequest),
        ("http://[::1/", BadRequest),
        ("http://api.example:99999/", BadRequest),
        ("http:///nohost", BadRequest),
        ("http://api.example/a/../admin", BadRequest),
        ("http://api.example/a/%2e%2e/admin", BadRequest),
        ("http://api.example#frag/", BadRequest),
        ("http://api.example/a#frag", BadRequest),
    ],
)
def test_bad_targets_are_refused(target: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        table([], ["s"]).resolve("GET", target)


def test_parse_target_keeps_raw_path_and_query() -> None:
    t = parse_target("http://API.example:8080/a%2Fb/c?x=1&y=%20")
    assert (t.host, t.port, t.path, t.query) == ("api.example", 8080, "/a%2Fb/c", "x=1&y=%20")
    upper = parse_target("HTTP://api.example")
    assert (upper.scheme, upper.host, upper.port, upper.path) == ("http", "api.example", 80, "/")
    v6 = parse_target("http://[2001:db8::1]/p")
    assert (v6.host, v6.port) == ("2001:db8::1", 80)
