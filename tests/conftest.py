"""Test-wide settings: real data from ../shared/data, nothing from the internet, no telemetry."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NANOCHAT_TEST_DATA", REPO.parent / "shared" / "data")).resolve()

os.environ.setdefault("NANOCHAT_DATA", str(SHARED_DATA))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "pretrain").is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set NANOCHAT_TEST_DATA)")
    return SHARED_DATA
