"""Output meant for people: tables readable at 80 columns, progress as plain lines in a log file, and tokens with
their invisible characters shown by one function (glyphs) in the terminal, in `inspect` and on the review page."""

from __future__ import annotations

import io
import re
import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from autointerp.cli.render import features_table, inspect_lines
from autointerp.cli.show import highlighted
from autointerp.jobs import LogLines
from autointerp.query.inspect import InspectResult, TokenFiring
from autointerp.records import glyphs
from autointerp.store.queries import FeatureSummary

MODEL = "smollm2-135m-instruct"
LONG = "the token taxes and words about money and tariffs in the speeches of the presidents of the last century"


def _row(key: str, score: float | None = None, explanation: str | None = None, model: str = MODEL) -> FeatureSummary:
    site, source, index = key.rsplit("/", 3)[-3:]
    return FeatureSummary(f"{model}/{key}", site, source, int(index), model, "ok", 12.3456, 0.0123, 0.0456, 290000,
                          score, explanation)  # fmt: skip


def _render(table: object, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.file.getvalue().splitlines()  # type: ignore[attr-defined]


def test_ids_are_never_wrapped_at_80_columns() -> None:
    rows = [
        _row("blocks.12.resid.post/3f2a9c1d0e4b5a6f/4095", 0.312, LONG),
        _row("blocks.12.mlp.post/neurons/1153", None, None),
    ]
    for width in (80, 100, 160):
        lines = _render(features_table(rows, width=width), width)
        assert all(len(line) <= width for line in lines)
        text = "\n".join(lines)
        assert f"model {MODEL}" in lines[0]  # the shared prefix moves to the title...
        for r in rows:  # ...and every id is whole on one line
            assert any(r.id.removeprefix(MODEL + "/") in line for line in lines), text
        assert "0.312" in text and "12.3" in text and "4.6%" in text
    narrow, wide = _render(features_table(rows, width=80), 80), _render(features_table(rows, width=160), 160)
    assert any(line.strip().startswith("the token taxes") for line in narrow)  # its own line under the feature
    assert any("4095" in line and "the token taxes" in line for line in wide)  # beside the figures


def test_ids_of_several_models_stay_whole() -> None:
    rows = [_row("blocks.1.mlp.post/neurons/7", model="a-model"), _row("blocks.1.mlp.post/neurons/7", model="b")]
    lines = _render(features_table(rows, width=80), 80)
    assert any("a-model/blocks.1.mlp.post/neurons/7" in line for line in lines)
    assert any("b/blocks.1.mlp.post/neurons/7" in line for line in lines)


def test_log_lines_every_tenth_and_at_the_end() -> None:
    out, t = io.StringIO(), [0.0]
    log = LogLines(out, every_s=30.0, now=lambda: t[0])
    for done in range(0, 101):
        t[0] = done * 0.1
        log("score", done, 100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and all("\x1b" not in line for line in lines)  # 0 %, 10 %, ... 100 %; no escapes
    assert lines[-1].endswith("score: 100/100 (100%), 0m10s elapsed")
    assert "score: 50/100 (50%), 0m05s elapsed, about 0m05s left" in lines[5]


def test_log_lines_while_slow_at_most_every_interval() -> None:
    out, t = io.StringIO(), [0.0]
    log = LogLines(out, every_s=30.0, now=lambda: t[0])
    for done in range(0, 6):  # 5 units of 1000, 20 s each: no tenth reached, a line every 30 s
        t[0] = done * 20.0
        log("explain", done, 1000)
    assert [line.split(" ", 1)[1].split(" (")[0] for line in out.getvalue().splitlines()] == [
        "explain: 0/1000",
        "explain: 2/1000",
        "explain: 4/1000",
    ]


def test_progress_is_bars_on_a_terminal_and_log_lines_in_a_file() -> None:
    from autointerp.cli.progress import progress

    piped = io.StringIO()
    with progress(Console(file=piped, force_terminal=False)) as update:
        assert isinstance(update, LogLines)
        update("explain", 8, 8)
    assert re.fullmatch(r"\d\d:\d\d:\d\d explain: 8/8 \(100%\), 0m00s elapsed\n", piped.getvalue())
    tty = io.StringIO()
    with progress(Console(file=tty, force_terminal=True, width=100)) as update:
        assert not isinstance(update, LogLines)
        update("explain", 8, 8)
    assert "explain" in tty.getvalue() and "8/8" in tty.getvalue() and "━" in tty.getvalue()  # a drawn bar


# Characters that move the cursor, break a line, ring, clear or start an escape sequence, or print as nothing.
CONTROLS = [c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


def _hidden(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


def test_every_control_character_has_a_mark_of_its_own() -> None:
    marks = {c: glyphs(c) for c in CONTROLS}
    assert len(CONTROLS) == 67 and all(m and m.isprintable() and not _hidden(m) for m in marks.values()), marks
    assert len(set(marks.values())) == len(CONTROLS)  # two control characters never look the same
    assert (marks["\n"], marks["\t"], marks["\r"], marks["\x1b"]) == ("⏎", "⇥", "␍", "␛")  # ⏎ ⇥: as always


@given(st.text(st.one_of(st.sampled_from(CONTROLS), st.characters(codec="utf-8"))))
def test_glyphs_mark_the_controls_and_change_nothing_else(text: str) -> None:
    shown = glyphs(text)
    assert not _hidden(shown)
    assert shown == "".join(glyphs(c) for c in text)  # character by character, in order
    assert [c for c in text if c not in CONTROLS] == [c for c in text if glyphs(c) == c]  # the rest as it is


def test_the_terminal_shows_the_marks() -> None:
    # raw, "\r" vanished in rich and "\x1b[1m" turned the rest of the line bold
    text = highlighted(["a\r\n", "\x1b[1m", "\t", "\u2028"], [0.0, 1.0, 0.0, 0.0], 1.0)
    assert text.plain == "a␍⏎<<␛[1m>>⇥\\u2028"
    result = InspectResult(
        "m", "", 2, 24, 1, 0, ["s/neurons"], [TokenFiring(0, 0, "\r\n", []), TokenFiring(1, 0, "\x07", [])]
    )
    assert [line.plain for line in inspect_lines(result)][2:5:2] == ["   0 '␍⏎'", "   1 '␇'"]


def test_features_show_and_the_review_page_show_the_marks(collected_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import autointerp.records
    from autointerp.cli.show import print_feature
    from autointerp.review.pages import feature_page
    from autointerp.store import open_store

    def decode(ids: list[int]) -> list[str]:
        return ["\r\n\x1b", *(["\t"] * (len(ids) - 1))]

    monkeypatch.setattr(autointerp.records, "decoder", lambda _store, _model: decode)
    store = open_store(collected_db, writable=False)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_feature(console, store, "blocks.1.mlp.post/neurons/5", per_role=1)
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "␍⏎␛" in printed and "⇥" in printed and not _hidden(printed.replace("\n", ""))
    page = feature_page(store, "blocks.1.mlp.post/neurons/5", lambda _model: decode)
    shown = [t.text for _role, group in page["groups"] for rec in group for t in rec["tokens"]]
    assert shown[0] == "␍⏎␛" and set(shown) == {"␍⏎␛", "⇥"}
