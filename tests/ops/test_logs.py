"""The audit is its own stream: ``log.level: warning`` does not silence it; ``audit.enabled``
does."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from sidecar import config
from sidecar.devstack.stack import SAAS_HOST, DevStack
from sidecar.ops import logs as logs_module
from sidecar.runtime import Sidecar
from tests.conftest import AppClient, LogCapture

URL = f"http://{SAAS_HOST}/v1/invoices"


@pytest.fixture
def restore_levels() -> Iterator[None]:
    audit = logging.getLogger(logs_module.AUDIT)
    before = audit.level
    yield
    audit.setLevel(before)


def audited(logs: LogCapture) -> list[str]:
    return [r.getMessage() for r in logs.records if r.name == "sidecar.audit"]


@pytest.mark.usefixtures("restore_levels")
@pytest.mark.parametrize("enabled", [True, False])
async def test_the_audit_follows_its_own_setting_not_log_level(
    stack: DevStack, logs: LogCapture, enabled: bool
) -> None:
    doc = stack.sidecar_config(log={"level": "warning"}, audit={"enabled": enabled})
    cfg = config.parse(doc)
    assert (cfg.log_level, cfg.audit) == ("warning", enabled)
    logging.getLogger().setLevel(logging.WARNING)  # as logs.configure() would for log.level
    async with Sidecar(cfg, grace=5.0) as sidecar, AppClient(sidecar) as app:
        assert (await app.request("GET", URL))[0] == 200
    messages = audited(logs)
    if enabled:
        assert "request" in messages
        assert "token issued" in messages
    else:
        assert messages == []
    assert not any(r.levelno < logging.WARNING and r.name != "sidecar.audit" for r in logs.records)


@pytest.mark.usefixtures("restore_levels")
def test_set_audit_is_independent_of_the_root_level() -> None:
    logging.getLogger().setLevel(logging.ERROR)
    logs_module.set_audit(True)
    assert logging.getLogger(logs_module.AUDIT).isEnabledFor(logging.INFO)
    logs_module.set_audit(False)
    assert not logging.getLogger(logs_module.AUDIT).isEnabledFor(logging.CRITICAL)


def test_the_redacting_filter_keeps_non_string_arguments_and_redacts_inside_them() -> None:
    """Third-party libraries log with %d and %r arguments (urllib3 does): redaction must not
    turn them into strings a format cannot take, and a JWT inside str(arg) is still caught."""
    jwt_like = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"

    class Holder:
        def __str__(self) -> str:
            return f"holder of {jwt_like}"

    record = logging.LogRecord("urllib3", logging.DEBUG, __file__, 1, "%s:%d %s", None, None)
    record.args = ("host", 443, Holder())
    assert logs_module.RedactingFilter().filter(record)
    message = record.getMessage()
    assert message == "host:443 holder of [redacted]"
    assert jwt_like not in logs_module.JsonFormatter().format(record)


def test_the_redacting_filter_survives_arguments_that_do_not_fit() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d things", ("many",), None)
    assert logs_module.RedactingFilter().filter(record)
    assert "many" in record.getMessage()


def test_fields_are_redacted_once_and_the_json_line_carries_only_them() -> None:
    jwt_like = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    record = logging.LogRecord("sidecar.audit", logging.INFO, __file__, 1, "request", None, None)
    record.path = f"/callback/{jwt_like}"
    record.route = "saas"
    record.status = 200
    assert logs_module.RedactingFilter().filter(record)
    assert record.path == "/callback/[redacted]"  # another handler (a test's capture) sees it
    line = logs_module.JsonFormatter().format(record)
    assert jwt_like not in line
    doc = json.loads(line)
    assert {k: doc[k] for k in ("path", "route", "status")} == {
        "path": "/callback/[redacted]",
        "route": "saas",
        "status": 200,
    }
    assert not any(k.startswith("_") for k in doc)  # the filter's stash is not a field
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])


def test_the_formatter_alone_still_picks_the_fields() -> None:
    record = logging.LogRecord("sidecar", logging.INFO, __file__, 1, "m", None, None)
    record.route = "saas"
    assert '"route": "saas"' in logs_module.JsonFormatter().format(record)
