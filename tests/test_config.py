"""Config validation: every problem at once, each with its YAML path."""

import re
from pathlib import Path

import pytest
import yaml

from sidecar import config
from sidecar.errors import ConfigError

ENV = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spiffe/agent.sock"}


def minimal(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "authorization_servers": {"corp": {"issuer": "https://as.example.com"}},
        "destinations": [
            {
                "host": "api.saas.example",
                "upstream": "https://api.saas.example",
                "authorization_server": "corp",
                "resource": "https://api.saas.example",
                "scopes": {
                    "default": ["invoices:read"],
                    "rules": [
                        {
                            "methods": ["post"],
                            "paths": ["/v1/invoices/**"],
                            "scopes": ["invoices:write"],
                        }
                    ],
                },
            }
        ],
    }
    doc.update(overrides)
    return doc


def problems(doc: object, env: dict[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(doc, env=env)
    return list(info.value.problems)


def test_minimal_config_gets_safe_defaults() -> None:
    cfg = config.parse(minimal(), env=ENV)
    assert str(cfg.listen) == "127.0.0.1:15001"
    assert str(cfg.admin) == "127.0.0.1:15000"
    assert cfg.spiffe_socket == ENV["SPIFFE_ENDPOINT_SOCKET"]
    server = cfg.authorization_servers["corp"]
    assert (server.client_auth, server.grant, server.dpop) == (
        "jwt_svid",
        "client_credentials",
        True,
    )
    assert server.jwt_svid_audience == "https://as.example.com"
    dest = cfg.destinations[0]
    assert dest.name == "api.saas.example"
    assert dest.token_type == "dpop"
    assert dest.rules[0].methods == frozenset({"POST"})


def test_every_problem_is_reported_with_its_path() -> None:
    doc = minimal(listen="0.0.0.0:15001", bogus=1)
    doc["destinations"] = [
        {
            "host": "API_bad",
            "authorization_server": "nope",
            "upstream": "ftp://x",
            "scopes": {"rules": [{"methods": ["GET /"], "paths": ["v1/*x"], "scopes": ["a b"]}]},
        },
    ]
    found = problems(doc)
    expected = [
        "bogus: unknown key",
        "listen: 0.0.0.0:15001 is not a loopback address",
        "destinations[0].host: must be a lower-case host name",
        "destinations[0].upstream: must be an absolute http(s) URL",
        "destinations[0].authorization_server: unknown authorization server 'nope'",
        "destinations[0].scopes.rules[0].methods[0]: must be an HTTP method",
        "destinations[0].scopes.rules[0].paths[0]: must be a path glob starting with '/'",
        "destinations[0].scopes.rules[0].scopes[0]: must be a scope token",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)


def test_non_loopback_listen_needs_explicit_opt_in() -> None:
    everywhere = "0.0.0.0:15001"
    cfg = config.parse(minimal(listen=everywhere, allow_non_loopback=True), env=ENV)
    assert cfg.listen.host == "0.0.0.0"  # noqa: S104


def test_duplicate_hosts_and_missing_socket() -> None:
    doc = minimal()
    doc["destinations"] = [doc["destinations"][0], dict(doc["destinations"][0], name="b")]  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        config.parse(doc, env={})
    text = str(info.value)
    assert "destinations[1].host: 'api.saas.example' is already routed by destinations[0]" in text
    assert "spiffe.socket: needs socket" in text


def test_authorization_server_needs_issuer_or_endpoint() -> None:
    found = problems(minimal(authorization_servers={"corp": {"client_auth": "magic"}}))
    assert any(p.startswith("authorization_servers.corp: needs an issuer") for p in found)
    assert any(
        p.startswith("authorization_servers.corp.client_auth: must be one of") for p in found
    )


def test_load_reports_yaml_syntax_errors_with_line(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("listen: [\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        config.load(path, env=ENV)


def test_load_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.yaml", env=ENV)
    with pytest.raises(ConfigError, match="SIDECAR_CONFIG"):
        config.load(None, env={})


def test_shipped_example_config_is_valid() -> None:
    cfg = config.load(Path(__file__).parents[1] / "config" / "sidecar.yaml", env=ENV)
    assert cfg.destinations


def test_every_recipe_in_the_config_docs_is_valid() -> None:
    text = (Path(__file__).parents[1] / "config" / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    for block in blocks:
        doc = yaml.safe_load(block)
        if "destinations" not in doc:  # a server recipe: route one host through it
            server = next(iter(doc["authorization_servers"]))
            doc["destinations"] = [{"host": "api.example", "authorization_server": server}]
        config.parse(doc, env=ENV)  # raises ConfigError with every problem


def test_ports_can_be_overridden_per_pod_from_the_environment() -> None:
    env = {**ENV, "SIDECAR_LISTEN": "127.0.0.1:16001", "SIDECAR_ADMIN": "127.0.0.1:16000"}
    cfg = config.parse(minimal(listen="127.0.0.1:15001"), env=env)
    assert (cfg.listen.port, cfg.admin.port) == (16001, 16000)
    found = problems(minimal(), env={**ENV, "SIDECAR_LISTEN": "0.0.0.0:80"})
    assert any(p.startswith("listen:") and "not a loopback" in p for p in found)
    # The admin address from the pod spec may be the pod IP (kubelet probes); the proxy's may not.
    cfg = config.parse(minimal(), env={**ENV, "SIDECAR_ADMIN": "0.0.0.0:15000"})
    assert cfg.admin.port == 15000
    found = problems(minimal(), env={**ENV, "SIDECAR_ADMIN": "nonsense"})
    assert "admin: (from $SIDECAR_ADMIN) must be host:port" in found  # the value: not echoed


def test_token_wait_readiness_and_audit_defaults_and_values() -> None:
    cfg = config.parse(minimal(), env=ENV)
    assert (cfg.token_wait, cfg.readiness, cfg.audit) == (3.0, "startup", True)
    cfg = config.parse(
        minimal(tokens={"wait": 0.5}, readiness="strict", audit={"enabled": False}), env=ENV
    )
    assert (cfg.token_wait, cfg.readiness, cfg.audit) == (0.5, "strict", False)


def test_token_wait_readiness_and_audit_problems_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(
            minimal(tokens={"wait": 0}, readiness="eventually", audit={"enabled": "yes", "x": 1}),
            env=ENV,
        )
    problems = "\n".join(info.value.problems)
    assert "tokens.wait: must be a positive number" in problems
    assert "readiness: must be one of startup, strict" in problems
    assert "audit.enabled: must be bool" in problems
    assert "audit.x: unknown key" in problems
    with pytest.raises(ConfigError, match=r"tokens\.wait: must be at most 60"):
        config.parse(minimal(tokens={"wait": 61}), env=ENV)


# -- issue 15: cleartext, method tokens, files that are not YAML at all ------------------------


@pytest.mark.parametrize(
    ("where", "change"),
    [
        ("destinations[0].upstream", {"upstream": "http://api.saas.example"}),
        ("authorization_servers.corp.issuer", {"issuer": "http://as.example.com"}),
        ("authorization_servers.corp.token_endpoint", {"token_endpoint": "HTTP://as.example/t"}),
    ],
)
def test_cleartext_urls_are_refused_unless_marked_development_only(
    where: str, change: dict[str, str]
) -> None:
    def doc(flag: bool) -> dict[str, object]:
        d = minimal()
        item: dict[str, object] = (
            d["destinations"][0]  # type: ignore[index]
            if where.startswith("destinations")
            else d["authorization_servers"]["corp"]  # type: ignore[index]
        )
        item.update(change)
        if flag:
            item["allow_cleartext_development_only"] = True
        return d

    found = problems(doc(False))
    assert any(p.startswith(f"{where}: http:// sends tokens") for p in found), found
    cfg = config.parse(doc(True), env=ENV)
    assert config.cleartext_settings(cfg) == [where]
    assert config.cleartext_settings(config.parse(minimal(), env=ENV)) == []


def test_rules_take_any_method_token() -> None:
    doc = minimal()
    doc["destinations"][0]["scopes"]["rules"][0]["methods"] = ["PROPFIND", "purge"]  # type: ignore[index]
    (rule,) = config.parse(doc, env=ENV).destinations[0].rules
    assert rule.methods == {"PROPFIND", "PURGE"}


def test_errors_name_the_path_never_the_value() -> None:
    secret = "s3cr3t-value-never-echoed"
    doc = minimal(log={"level": secret}, listen=secret)
    doc["destinations"][0]["token_type"] = secret  # type: ignore[index]
    # Unknown keys are named when they look like a key (short, [A-Za-z0-9_.-]); a long one
    # (a secret mis-indented into a key) is not.
    doc["destinations"][0][secret * 2] = 1  # type: ignore[index]
    found = problems(doc)
    assert "destinations[0].<key>: unknown key" in " ".join(found)
    assert len(found) >= 4
    assert not any(secret in p for p in found), found


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"listen: \xff\xfe127.0.0.1:1\n", "not UTF-8"),
        (b"\x00\x01\x02binary\x00", "not valid YAML"),
        (b"a: " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"a: " + b"{x: " * 3000 + b"1" + b"}" * 3000, "nested too deeply"),
        (b"a: 2001-02-30\n", "not a usable config"),
    ],
)
def test_unreadable_files_are_one_config_error(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        config.load(path, env=ENV)
    (problem,) = info.value.problems
    assert says in problem
    assert "\n" not in problem
