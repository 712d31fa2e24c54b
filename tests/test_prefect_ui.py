"""The Prefect UI path, in a real headless Chromium (Playwright) against a real `prefect server start` (its default
V2 UI, served offline) and a real process worker: the deployments registered from deployments/prefect.yaml, a
tiny speedrun typed into the speedrun deployment's Custom run form (preset select, per-stage fields), run to
completion, and its report card and chat-server link shown on the run's Artifacts tab; the link opens the chat UI.

Screenshots go to test-artifacts/ (gitignored). About 2.5 minutes on 2 cores, so marked slow.
"""

import dataclasses
import json
import os
import re
import signal
from pathlib import Path
from uuid import UUID

import pytest
from conftest import CHROMIUM
from test_deployments import (
    POOL,
    PREFECT,
    PRESET_NAMES,
    REPO,
    final_state,
    flow_run,
    prefect_env,
    prefect_server,
    run_prefect,
    wait_for,
    worker,
)
from test_flows import MICRO, free_port

from flows.serve import health
from nanochat_core.pipeline import stages

ARTIFACTS = REPO / "test-artifacts"
STAGE_FIELDS = {stage: fields for stage, fields in MICRO.items() if stage != "rl"}  # the rl stage does not run

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def prefect_api(prefect_home):
    with prefect_server(prefect_home) as api_url:
        yield api_url


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def field(scope, title: str):
    """The form block of one parameter (its label row and its input), by the title its label shows."""
    label = scope.locator("label", has_text=re.compile(rf"^{re.escape(title)} \(Optional\)$")).first
    return label.locator("xpath=../../..")


def stage_form(page, stage: str):
    """Open the stage's fields under `overrides` (its <Stage>Overrides tab) and return the fieldset holding them."""
    tab = page.get_by_role("tab", name=f"{stage.capitalize()}Overrides", exact=True)
    tab.click()
    return page.locator("fieldset").filter(has=tab).last


def open_custom_run(page, ui_url: str) -> None:
    page.goto(ui_url)
    page.get_by_role("link", name="Deployments").first.click()
    page.get_by_role("link", name="speedrun", exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()


def choose_preset(page, preset: str) -> list[str]:
    """Pick `preset` in the preset select; returns the presets it offered."""
    page.get_by_role("button", name="Select preset").click()
    offered = [option.inner_text() for option in page.get_by_role("option").all()]
    page.get_by_role("option", name=preset, exact=True).click()
    return offered


def shown_fields(page, stage: str) -> set[str]:
    """The titles of the fields the form shows for one stage's overrides."""
    labels = stage_form(page, stage).locator("label").all_inner_texts()
    return {label.removesuffix(" (Optional)") for label in labels}


def config_fields(stage: str) -> set[str]:
    """The titles the form should show: one per field of the stage's config dataclass."""
    return {f.name.replace("_", " ").title() for f in dataclasses.fields(stages.STAGES[stage].config_cls())}


def fill_overrides(page, overrides: dict[str, dict[str, int]]) -> None:
    """Type each stage override into its field of the form (an int field starts as None: choose int, then type)."""
    for stage, values in overrides.items():
        form = stage_form(page, stage)
        for name, value in values.items():
            block = field(form, name.replace("_", " ").title())
            block.get_by_role("tab", name="int", exact=True).click()
            block.locator("input").first.fill(str(value))


def speedrun_runs(deployment_id: UUID) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["speedrun"])),
                                     deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def stop_chat_servers(store: Path) -> None:
    """The chat server outlives the speedrun by design: cancel the serve run holding it (the worker then stops
    it), or kill the detached process, as <store>/runs/server-<port>.json records."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    for path in store.glob("runs/server-*.json"):
        state = json.loads(path.read_text())
        if "flow_run_id" in state:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(UUID(state["flow_run_id"]), Cancelling(), force=True)
            wait_for(lambda url=state["url"]: health(url) is None, 90, "the chat server to stop")
        else:
            try:
                os.killpg(state["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_speedrun_from_the_ui_shows_its_report_card_and_server_link(prefect_api, prefect_home, page, tmp_path):
    from prefect.client.orchestration import get_client

    store = tmp_path / "store"
    env = {**prefect_env(prefect_home, prefect_api), "NANOCHAT_REPO": str(REPO), "NANOCHAT_STORE": str(store)}
    # the README's steps: a process pool, the deployments from prefect.yaml (not evaluate: the runs that each
    # checkpoint event triggers would compete for the 2 cores), a worker
    run_prefect([*PREFECT, "work-pool", "create", POOL, "--type", "process"], env)
    run_prefect([*PREFECT, "--no-prompt", "deploy", "--name", "speedrun", "--name", "serve",
                 "--prefect-file", "deployments/prefect.yaml"], env)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("speedrun/speedrun")
    ui_url = prefect_api.removesuffix("/api")
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)

    with worker(prefect_api, prefect_home, tmp_path / "worker.log") as proc:
        try:
            open_custom_run(page, ui_url)
            assert choose_preset(page, "tiny") == PRESET_NAMES
            page.get_by_role("tab", name="StageOverrides", exact=True).click()
            for stage in stages.STAGES:  # every stage, every field of its config
                assert shown_fields(page, stage) == config_fields(stage), stage
            fill_overrides(page, STAGE_FIELDS)
            field(page, "port").locator("input").first.fill(str(port))
            page.screenshot(path=str(ARTIFACTS / "prefect-ui-custom-run.png"), full_page=True)
            page.get_by_role("button", name="Submit", exact=True).click()

            run = wait_for(lambda: speedrun_runs(deployment.id), 30, "the run the form created")[0]
            assert run.parameters["preset"] == "tiny" and run.parameters["port"] == port
            typed = {stage: {k: v for k, v in (values or {}).items() if v is not None}
                     for stage, values in run.parameters["overrides"].items()}
            assert {stage: values for stage, values in typed.items() if values} == STAGE_FIELDS  # and nothing else
            state = wait_for(lambda: final_state(run.id), 600, "the speedrun", proc, tmp_path / "worker.log")
            assert state.is_completed(), state

            # the run, as the UI shows it: Completed, with its artifacts
            page.goto(ui_url)
            page.get_by_role("link", name="Deployments").first.click()
            page.get_by_role("link", name="speedrun", exact=True).first.click()
            page.get_by_role("link", name=run.name, exact=True).click()
            page.get_by_text("Completed", exact=True).first.wait_for()
            page.get_by_role("tab", name="Artifacts", exact=True).click()
            for key in ("report-card", "report-summary", "chat-server", "base-loss-curve"):
                page.get_by_text(key, exact=True).wait_for()
            page.screenshot(path=str(ARTIFACTS / "prefect-ui-artifacts.png"), full_page=True)

            page.get_by_text("report-card", exact=True).click()
            page.get_by_role("heading", name="nanochat training report").wait_for()
            page.screenshot(path=str(ARTIFACTS / "prefect-ui-report-card.png"), full_page=True)

            page.go_back()
            page.get_by_text("chat-server", exact=True).click()
            link = page.get_by_role("link", name="nanochat chat server")
            assert link.get_attribute("href") == f"http://127.0.0.1:{port}"
            page.goto(link.get_attribute("href"))  # the link leads to the chat UI
            assert page.title() == "nanochat"
            page.screenshot(path=str(ARTIFACTS / "prefect-ui-chat-server.png"))
            server = json.loads((store / "runs" / f"server-{port}.json").read_text())
            assert flow_run(UUID(server["flow_run_id"])).state.is_running()  # held by a run of `serve`
        finally:
            stop_chat_servers(store)
