"""Report card rendering (partial data, every summary row, '-' for missing cells) and the loss-curve PNG."""

import pytest

from nanochat_core.pipeline import report

SYSTEM = {"Platform": "TestOS", "CPUs": "2", "RAM": "4.0 GiB", "GPU": "none", "Python": "3.x", "PyTorch": "2.x"}


def summary_rows(text: str) -> dict[str, list[str]]:
    """Summary table rows as {metric: [BASE, MID, SFT, RL] cells}."""
    table = text.split("## Summary", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in report.SUMMARY_ROWS:
            rows[cells[0]] = cells[1:]
    return rows


def partial_run() -> dict:
    return {
        "run_id": "run-123",
        "started": "2026-01-01T12:00:00+00:00",
        "stages": {
            "sft": {"metrics": {"val_loss": 1.2345678}, "config": {"num_iterations": 60}, "seconds": 30.0,
                    "cached": False},
            "tokenizer": {"metrics": {"vocab_size": 4096, "bytes_per_token": 4.1234}, "config": {"vocab_size": 4096},
                          "seconds": 5.0, "cached": True},
            "base": {"metrics": {"val_bpb": 1.8, "unigram_bpb": 2.5, "steps": 400, "tok_per_sec": 123456},
                     "config": {"depth": 4, "secret_internal_knob": 1}, "seconds": 125.0, "cached": False},
        },
        "evals": {"base": {"CORE": 0.05}, "sft": {"ARC-Easy": 0.3, "GSM8K": 0.0, "ChatCORE": 0.0333}},
    }


def test_partial_report_has_every_row_and_dashes():
    text = report.render_report(partial_run(), system=SYSTEM)
    rows = summary_rows(text)
    assert list(rows) == list(report.SUMMARY_ROWS)
    assert rows["CORE"] == ["0.0500", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "-", "0.3000", "-"]
    assert rows["GSM8K"] == ["-", "-", "0.0000", "-"]
    assert rows["ChatCORE"] == ["-", "-", "0.0333", "-"]
    for missing in ("ARC-Challenge", "MMLU", "HumanEval"):
        assert rows[missing] == ["-"] * 4


def test_report_sections_header_and_total_time():
    text = report.render_report(partial_run(), system=SYSTEM)
    assert "- Run: run-123" in text and "2026-01-01T12:00:00+00:00" in text
    assert "- Platform: TestOS" in text and "- CPUs: 2" in text
    # stages in pipeline order, whatever the dict order
    assert text.index("## Tokenizer training") < text.index("## Base model training") < text.index("## Chat SFT")
    assert "- bytes_per_token: 4.1234" in text
    assert "- tok_per_sec: 123,456" in text  # big ints get separators
    assert "- val_loss: 1.2346" in text
    assert "- depth: 4" in text and "secret_internal_knob" not in text  # config highlights only
    assert "(cached" in text.split("## Tokenizer training")[1].split("##")[0]
    assert "Total wall clock time: 2m40s (1 of 3 stages cached)" in text


def test_report_fallback_without_evals():
    run = partial_run()
    del run["evals"]
    run["stages"]["base_eval"] = {"stage": "eval", "metrics": {"CORE": 0.11, "phase": "base"},
                                  "config": {"tasks": "auto", "secret": 1}, "seconds": 15.0, "cached": False}
    run["stages"]["sft_eval"] = {"stage": "eval", "metrics": {"ARC-Easy": 0.4, "ChatCORE": 0.2, "SpellingBee": 0.5},
                                 "config": {"tasks": "auto"}, "seconds": 1.0, "cached": False}
    text = report.render_report(run, system=SYSTEM)
    rows = summary_rows(text)
    assert rows["CORE"] == ["0.1100", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "-", "0.4000", "-"]
    assert rows["SpellingBee"] == ["-", "-", "0.5000", "-"]
    assert "- tasks: auto" in text and "secret" not in text  # eval nodes show the eval stage's highlights
    # wall time per phase: its training node plus its evaluation node
    assert "| Wall time | 2m20s | - | 31.0s | - |" in text
    # cells given in "evals" win; the others still come from the stages
    run["evals"] = {"sft": {"ARC-Easy": 0.5}}
    rows = summary_rows(report.render_report(run, system=SYSTEM))
    assert rows["CORE"] == ["0.1100", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "-", "0.5000", "-"]
    assert rows["ChatCORE"] == ["-", "-", "0.2000", "-"]


def test_loss_curves_are_linked_from_their_stage_section():
    run = partial_run()
    run["curves"] = {"base": "base_loss.png"}
    text = report.render_report(run, system=SYSTEM)
    base_section = text.split("## Base model training")[1].split("##")[0]
    assert "![base training loss](base_loss.png)" in base_section


def test_empty_run_renders():
    rows = summary_rows(report.render_report({}, system=SYSTEM))
    assert all(cells == ["-"] * 4 for cells in rows.values()) and len(rows) == len(report.SUMMARY_ROWS)


def test_real_system_info_header():
    text = report.render_report(partial_run())
    for key in ("Platform", "CPUs", "RAM", "GPU", "Python", "PyTorch"):
        assert f"- {key}: " in text


def test_format_helpers():
    assert report.format_duration(3 * 3600 + 51 * 60 + 10) == "3h51m"
    assert report.format_duration(75) == "1m15s"
    assert report.format_value(12345) == "12,345" and report.format_value(999) == "999"
    assert report.format_value(0.123456) == "0.1235"


def test_save_loss_curve_png(tmp_path):
    path = tmp_path / "curves" / "loss.png"
    report.save_loss_curve([(0, 4.0), (10, 3.1), (20, 2.7)], path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temp file left behind
    with pytest.raises(ValueError):
        report.save_loss_curve([], tmp_path / "empty.png")
    with pytest.raises(ValueError):
        report.save_loss_curve([(1, "not a number")], tmp_path / "bad.png")
