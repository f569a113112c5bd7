"""Routing: target parsing, host matching, and the scope-rule precedence (table-driven)."""

import dataclasses

import pytest

from sidecar import config, routing
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


# -- hosts: one typed value, or a 400 (issue 15, class 1) -----------------------------------

LDH = set("abcdefghijklmnopqrstuvwxyz0123456789-.")
# Every printable ASCII character that may not stand in a label ('/' ends the authority).
DISALLOWED = sorted(c for c in map(chr, range(0x21, 0x7F)) if c.lower() not in LDH and c not in "/")


def wild_table(upstream: str | None = None) -> RoutingTable:
    wild: dict[str, object] = {"host": "*.wild.test", "authorization_server": "as"}
    wild["scopes"] = {"default": ["w"]}
    if upstream:
        wild["upstream"] = upstream
    doc = {
        "authorization_servers": {"as": {"token_endpoint": "https://as.example/token"}},
        "destinations": [
            wild,
            {"host": "api.example", "authorization_server": "as", "scopes": {"default": ["a"]}},
            {"host": "*.tunnel.test", "tunnel": True},
        ],
    }
    return RoutingTable(config.parse(doc, env=ENV))


@pytest.mark.parametrize("char", DISALLOWED)
@pytest.mark.parametrize("shape", ["x{c}y.wild.test", "{c}.wild.test", "localhost{c}.wild.test"])
def test_every_disallowed_character_in_a_label_is_a_400(char: str, shape: str) -> None:
    host = shape.format(c=char)
    with pytest.raises(BadRequest):
        wild_table().resolve("GET", f"http://{host}/v1/x")
    with pytest.raises(BadRequest):
        wild_table().tunnel_for(f"{host.replace('wild', 'tunnel')}:443")


@pytest.mark.parametrize(
    "host",
    [
        ".wild.test",  # empty label
        "a..wild.test",
        "-a.wild.test",  # LDH: no leading or trailing hyphen
        "a-.wild.test",
        "a" * 64 + ".wild.test",  # labels are at most 63 octets
        ("a" * 61 + ".") * 4 + "wild.test",  # names at most 253
        "bücher.wild.test",  # U-labels: send the A-label
        "xn--zz.wild.test",  # an A-label that does not decode
        "ab--c.wild.test",  # reserved (R-LDH) label
        "evil].wild.test",
        "[evil].wild.test",
        "[::1].wild.test",
        "localhost?.wild.test",
        "167772161?.wild.test",
        "a.wild.test..",
    ],
)
def test_malformed_hosts_are_400_not_500(host: str) -> None:
    with pytest.raises(BadRequest):
        wild_table().resolve("GET", f"http://{host}/v1/x")


@pytest.mark.parametrize(
    "host", ["167772161.wild.test", "0.wild.test", "10.0.0.1", "0x7f.0.0.1", "127.1", "1.2.3"]
)
def test_numeric_labels_and_addresses_are_never_synthesised_into_a_dial(host: str) -> None:
    # 400, or (a valid dotted quad no route names) 403: never a wildcard dial.
    with pytest.raises((BadRequest, UnknownDestination)):
        wild_table().resolve("GET", f"http://{host}/v1/x")
    with pytest.raises((BadRequest, UnknownDestination)):
        wild_table().tunnel_for(f"{host.replace('wild', 'tunnel')}:443")


def test_the_dialled_host_is_the_routed_host() -> None:
    resolved = wild_table().resolve("GET", "http://EU.wild.test./v1/x")
    assert resolved.target.host == "eu.wild.test"  # one trailing dot: the same, absolute name
    dial = resolved.route.dial(resolved.target)
    assert (dial.scheme, dial.host, dial.port, dial.netloc) == (
        "https",
        "eu.wild.test",
        443,
        "eu.wild.test",
    )
    idna = wild_table().resolve("GET", "http://xn--bcher-kva.wild.test/")
    assert idna.route.dial(idna.target).host == "xn--bcher-kva.wild.test"
    # A configured upstream is parsed once, at load; the requested host does not change it.
    routed = wild_table("https://up.example:8443").resolve("GET", "http://a.wild.test/")
    assert routed.route.dial(routed.target) == (
        "https",
        "up.example",
        8443,
        8443,
        "up.example:8443",
        False,  # not synthesised: the operator's name
    )


@pytest.mark.parametrize(
    "authority",
    [
        ".x.tunnel.test:443",
        "a.tunnel.test",
        "a.tunnel.test:",
        "a.tunnel.test:0",
        "a.tunnel.test:65536",
        "a@b.tunnel.test:443",
        "[::1:443",
        "a.tunnel.test:44 3",
    ],
)
def test_malformed_connect_authorities_are_400(authority: str) -> None:
    with pytest.raises(BadRequest):
        wild_table().tunnel_for(authority)


def test_a_wildcard_config_host_cannot_end_in_a_number() -> None:
    doc = {
        "authorization_servers": {"as": {"token_endpoint": "https://as.example/token"}},
        "destinations": [{"host": "*.0.1", "authorization_server": "as"}],
    }
    with pytest.raises(config.ConfigError):
        config.parse(doc, env=ENV)


# -- paths the scopes and the upstream could read differently (class 4) --------------------

REFUSED_PATHS = [
    "/v1/..%2fadmin",
    "/v1/%2e%2e%2fadmin",
    "/v1/..;/admin",
    "/v1/..\\admin",
    "/v1/%5c..%5cadmin",
    "/v1/.;/admin",
    "/v1/%252e%252e/admin",
    "/v1/%2E%2e/admin",
    "/v1/.%2E/admin",
    "/v1/%2e/admin",
    "/v1/a%2fb",
    "/v1/a%2Fb",
    "/v1/a%5Cb",
    "/v1/a\\b",
    "/v1/..;x=1/admin",
    "/v1/.../admin",
    "/v1/.. /admin",
    "/v1/%2e%2e%3b/admin",
    "/v1/%25252e%25252e/admin",
    "/v1/%2525252e/x",
    "/v1/%u002e%u002e/admin",
    "/v1/%c0%ae%c0%ae/admin",
    "/v1/%C0%AF",
    "/v1/%e0%80%ae%e0%80%ae/admin",
    "/v1/%f0%80%80%ae/admin",
    "/v1/%25c0%25ae/admin",
    "/v1/a%00b",
    "/v1/a/..",
    "/v1/.",
    "/v1/%252f",
    "/v1/%2e%2e",
]


@pytest.mark.parametrize("path", REFUSED_PATHS)
def test_ambiguous_paths_are_refused(path: str) -> None:
    assert routing.path_problem(path) is not None
    with pytest.raises(BadRequest):
        table([], ["s"]).resolve("GET", f"http://api.example{path}")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/a.json",
        "/.well-known/jwks.json",
        "/v1/a;v=1/b",
        "/v1/100%25",
        "/v1/a%20b",
        "/v1/%e2%82%ac",
        "/v1/a..b",
        "/v1/..a",
    ],
)
def test_ordinary_paths_pass(path: str) -> None:
    assert routing.path_problem(path) is None


def test_raw_paths_keep_encodings_but_never_literal_dot_segments() -> None:
    assert routing.path_problem("/v1/..%2fadmin", raw=True) is None
    assert routing.path_problem("/v1/%252e%252e/x", raw=True) is None
    assert routing.path_problem("/v1/../x", raw=True) is not None
    assert routing.path_problem("/v1/%2e%2e/x", raw=True) is not None


# -- method overrides (class 3) -----------------------------------------------------------


def override_table(policy: str | None) -> RoutingTable:
    dest: dict[str, object] = {
        "host": "api.example",
        "authorization_server": "as",
        "scopes": {
            "default": ["read"],
            "rules": [
                {"methods": ["POST"], "paths": ["/v1/**"], "scopes": ["write"]},
                {"methods": ["DELETE"], "paths": ["/v1/**"], "scopes": ["delete"]},
                {"methods": ["PROPFIND", "MOVE"], "paths": ["/dav/**"], "scopes": ["dav"]},
            ],
        },
    }
    if policy:
        dest["method_override"] = policy
    doc = {
        "authorization_servers": {"as": {"token_endpoint": "https://as.example/token"}},
        "destinations": [dest],
    }
    return RoutingTable(config.parse(doc, env=ENV))


@pytest.mark.parametrize(
    ("overrides", "target"),
    [
        ([("x-http-method-override", "DELETE")], "/v1/x"),
        ([("x-http-method", "DELETE")], "/v1/x"),
        ([("x-method-override", "DELETE")], "/v1/x"),
        ([("x-original-url", "/admin")], "/v1/x"),
        ([("x-rewrite-url", "/admin")], "/v1/x"),
        ([], "/v1/x?_method=DELETE"),
        ([], "/v1/x?a=1&_METHOD=DELETE"),
        ([], "/v1/x?a=1;_method=DELETE"),
        ([], "/v1/x?%5Fmethod=DELETE"),
        ([], "/v1/x?_method[]=DELETE"),
    ],
)
def test_method_overrides_are_refused_by_default(
    overrides: list[tuple[str, str]], target: str
) -> None:
    with pytest.raises(BadRequest) as info:
        override_table(None).resolve("POST", f"http://api.example{target}", overrides)
    assert "override" in info.value.detail


def test_strip_removes_the_override_and_scopes_on_the_real_method() -> None:
    resolved = override_table("strip").resolve(
        "POST", "http://api.example/v1/x?a=1&_method=DELETE&b=2", [("x-http-method", "DELETE")]
    )
    assert resolved.scopes == ("write",)
    assert resolved.strip_overrides
    assert resolved.target.query == "a=1&b=2"


def test_honour_scopes_on_the_overriding_method() -> None:
    t = override_table("honour")
    resolved = t.resolve("POST", "http://api.example/v1/x", [("x-http-method-override", "delete")])
    assert (resolved.scopes, resolved.method) == (("delete",), "DELETE")
    assert t.resolve("POST", "http://api.example/v1/x?_method=DELETE").scopes == ("delete",)
    for bad in (
        [("x-http-method", "DELETE"), ("x-method-override", "PUT")],
        [("x-original-url", "/admin")],
        [("x-http-method", "DE LETE")],
    ):
        with pytest.raises(BadRequest):
            t.resolve("POST", "http://api.example/v1/x", bad)


def test_rules_may_name_any_method_token() -> None:
    t = override_table(None)
    assert t.resolve("PROPFIND", "http://api.example/dav/a").scopes == ("dav",)
    assert t.resolve("MOVE", "http://api.example/dav/a").scopes == ("dav",)


def test_a_synthesised_host_is_resolved_as_an_absolute_name() -> None:
    # No resolv.conf search list for a name the app chose: eu.wild.test must not become
    # eu.wild.test.<namespace>.svc.cluster.local (a headless Service's pod).
    from sidecar.proxy.origin_client import Origin

    wild = wild_table().resolve("GET", "http://eu.wild.test/")
    assert wild.route.dial(wild.target).synthesised
    exact = wild_table().resolve("GET", "http://api.example/")
    assert not exact.route.dial(exact.target).synthesised  # the operator's name, as written
    assert Origin("eu.wild.test", 443, None, False, absolute=True).lookup_name == "eu.wild.test."
    assert Origin("api.example", 443, None, False).lookup_name == "api.example"
    assert Origin("10.0.0.1", 443, None, False, absolute=True).lookup_name == "10.0.0.1"


def test_a_wildcard_tunnel_host_is_resolved_as_an_absolute_name() -> None:
    from sidecar.routing import tunnel_lookup_name

    t = wild_table()
    dest, host, _ = t.tunnel_for("eu.tunnel.test:443")
    assert tunnel_lookup_name(dest, host) == "eu.tunnel.test."
    exact = dataclasses.replace(dest, host="db.tunnel.test")
    assert tunnel_lookup_name(exact, "db.tunnel.test") == "db.tunnel.test"
    assert tunnel_lookup_name(dest, "10.0.0.1") == "10.0.0.1"


def test_valid_host_memoises_answers_but_never_a_refusal() -> None:
    from sidecar.errors import BadRequest
    from sidecar.routing import valid_host

    assert valid_host.cache_info().maxsize == 1024  # bounded: app-controlled keys
    assert valid_host("API.Example.COM.") == "api.example.com"
    assert valid_host("API.Example.COM.") == "api.example.com"
    for _ in range(2):  # a refusal is raised every time, not remembered as an answer
        with pytest.raises(BadRequest):
            valid_host("bad_host.example")


def test_split_authority_memoises_answers_but_never_a_refusal() -> None:
    from sidecar.errors import BadRequest
    from sidecar.routing import split_authority

    assert split_authority.cache_info().maxsize == 1024  # bounded: app-controlled keys
    assert split_authority("API.Example:8443", 80) == ("api.example", 8443)
    assert split_authority("API.Example:8443", 80) == ("api.example", 8443)
    assert split_authority("api.example", 80) == ("api.example", 80)
    assert split_authority("api.example", 443) == ("api.example", 443)  # the default differs
    for bad in ("api.example:0", "api.example:99999", "[::1%eth0]:80", "bad_host.example"):
        for _ in range(2):  # a refusal is raised every time, not remembered as an answer
            with pytest.raises(BadRequest):
                split_authority(bad, 80)


@pytest.mark.parametrize("char", [".", "%", "\\", ";"])
def test_each_path_suspect_character_is_still_checked(char: str) -> None:
    # The fast path skips path_problem only for paths with none of these characters.
    from sidecar.errors import BadRequest

    t = table(RULES, default=["d"])
    dotted = {".": "/v1/./x", "%": "/v1/%2e%2e/x", "\\": "/v1\\..\\x", ";": "/v1/..;/x"}[char]
    with pytest.raises(BadRequest):
        t.resolve("GET", f"http://api.example{dotted}")
    assert t.resolve("GET", "http://api.example/v1/x").target.path == "/v1/x"
