"""SIGHUP's reload runs as a task the appliance holds: a reload that fails is logged with its cause,
and the appliance goes on serving the config it had."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import async_wait_for

from appliance import service
from appliance.config import load_config
from appliance.service import Reloader


async def test_a_failing_reload_is_logged_and_the_appliance_goes_on(
    start_inprocess_app: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n')
    config = load_config(path)
    admin = await start_inprocess_app(config)
    reloader = Reloader(admin.client.app, config)

    async def broken(app: Any, new: Any) -> list[str]:
        raise RuntimeError("the store went away")

    monkeypatch.setattr(service, "reload_declared", broken)
    with caplog.at_level(logging.INFO, logger="appliance.service"):
        reloader.request()

        def failure() -> logging.LogRecord | None:
            return next((r for r in caplog.records if r.name == "appliance.service" and "reload failed" in r.getMessage()), None)

        record = await async_wait_for(failure, timeout=10, what="the failed reload in the log")
        assert record.levelno == logging.ERROR and "the store went away" in record.getMessage() and record.exc_info is not None
        await async_wait_for(lambda: not reloader._tasks, timeout=10, what="the reload task let go once done")

        assert (await admin.client.get("/readyz")).status == 200  # still serving
        monkeypatch.undo()
        reloader.request()  # and the next SIGHUP reloads as ever
        await async_wait_for(lambda: any("applied" in r.getMessage() for r in caplog.records if r.name == "appliance.service"), timeout=10,
                             what="the next reload applied")
    await reloader.close()
