"""[[endpoints.autoscaling_rules]] in config.toml: created with their endpoint, updated and deleted as
the file changes (at start and on reload), in file order, while rules made through the API stay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Admin
from test_supervisor import WORKERS, fake_folder

from appliance.api.app import reload_declared

OUT = {"metric_source": "gateway", "metric_name": "latency_p95", "comparator": "GREATER_THAN", "threshold": 2.0, "step_size": 1}
IN = {"metric_source": "gateway", "metric_name": "inflight_per_replica", "comparator": "LESS_THAN", "threshold": 1, "step_size": -1, "cooldown_seconds": 60.0}


def _config(make_config: Any, folder: Path, rules: list[dict[str, Any]] | None, *, declared: bool = True) -> Any:
    endpoint = {"name": "chat", "model_folder": str(folder), "min_replicas": 1, "max_replicas": 3}
    if rules is not None:
        endpoint["autoscaling_rules"] = rules
    return make_config({"workers": WORKERS, "endpoints": [endpoint] if declared else []})


async def _rules(admin: Admin) -> list[dict[str, Any]]:
    status, body = await admin.call("GET", "/api/v1/endpoints/chat/autoscaling-rules")
    assert status == 200, body
    return body["data"]


async def test_declared_rules_follow_the_file(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "chat")
    admin = await start_inprocess_app(_config(make_config, folder, [OUT, IN]))
    rules = await _rules(admin)
    assert [(r["id"], r["metric_name"]) for r in rules] == [("asr-cfg-chat-1", "latency_p95"), ("asr-cfg-chat-2", "inflight_per_replica")]
    status, mine = await admin.call("POST", "/api/v1/endpoints/chat/autoscaling-rules", json_body={**OUT, "threshold": 9.0})
    assert status == 201

    app = admin.client.app
    assert await reload_declared(app, _config(make_config, folder, [OUT, IN])) == []  # unchanged: nothing happens
    events = (await admin.call("GET", "/api/v1/events?kind=autoscaling_rule")) [1]["data"]
    assert len([e for e in events if "config file" in e["message"]]) == 2  # the two creations only

    assert await reload_declared(app, _config(make_config, folder, [{**OUT, "threshold": 5.0}])) == []
    rules = await _rules(admin)
    assert [(r["id"], r["threshold"]) for r in rules] == [("asr-cfg-chat-1", 5.0), (mine["id"], 9.0)]  # the API's rule stays

    await reload_declared(app, _config(make_config, folder, None))  # no rules declared any more
    assert [r["id"] for r in await _rules(admin)] == [mine["id"]]

    await reload_declared(app, _config(make_config, folder, None, declared=False))  # the endpoint leaves the file
    assert (await admin.call("GET", "/api/v1/endpoints/chat"))[0] == 404


async def test_an_invalid_declared_rule_is_a_config_error(make_config: Any, tmp_path: Path) -> None:
    import pytest

    from appliance.errors import ApplianceError

    with pytest.raises(ApplianceError) as err:
        _config(make_config, fake_folder(tmp_path, "chat"), [{**OUT, "step_size": 0}])
    assert any("endpoints[0].autoscaling_rules[0].step_size" in p for p in err.value.problems), err.value.problems
