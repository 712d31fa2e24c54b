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
# A cold, busy machine (issue 12): a new test database plus prefect.server compiled from source took 47 s
# with one core busy; Prefect's default is 20 s. prefect_test_harness below uses this too.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect test server (temporary database) for one test module; its API URL.
    The harness isolates the database but not result storage, so that gets a temporary dir too."""
    from prefect.testing.utilities import prefect_test_harness

    previous = os.environ.get("PREFECT_LOCAL_STORAGE_PATH")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-storage"))
    try:
        # None: the start-up timeout is PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (set above)
        with prefect_test_harness(server_startup_timeout=None):
            from prefect.settings import PREFECT_API_URL

            yield PREFECT_API_URL.value()
    finally:
        if previous is None:
            os.environ.pop("PREFECT_LOCAL_STORAGE_PATH", None)
        else:
            os.environ["PREFECT_LOCAL_STORAGE_PATH"] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "pretrain").is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set NANOCHAT_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(shared_data, tmp_path_factory) -> Path:
    """A tokenizer (vocab 512 incl. the 9 specials) trained on ~300K chars of shard_00000, saved to a tmp dir.
    Load it with `nanochat_core.tokenizer.Tokenizer.load(tiny_tokenizer_dir)`."""
    import pyarrow.parquet as pq

    from nanochat_core.tok_train import train_bpe

    table = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet", columns=["text"])
    texts, chars = [], 0
    for text in table.column("text").to_pylist():
        texts.append(text)
        chars += len(text)
        if chars >= 300_000:
            break
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe(texts, vocab_size=512).save(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer, loaded."""
    from nanochat_core.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_dir)


CHROMIUM = "/usr/bin/chromium"  # Debian's chromium, driven by Playwright (never `playwright install`)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless"])
        yield browser
        browser.close()
