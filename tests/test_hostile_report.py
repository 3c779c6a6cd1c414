"""Reports escape every string they did not write: hostile method and split names and tags
(newlines, LaTeX specials, raw HTML, table separators) cannot change a report's structure."""
from __future__ import annotations

import csv
import io
import re

import pytest

from harness.registry import Registry
from harness.report import TABLES, render_report

# breaks out of a % comment, runs \input, opens math, closes groups, starts HTML, splits a table cell
NASTY = "x\n\\input{/etc/passwd}$^~{}\\&%#_ <script>alert(1)</script> | y\r\n\n`*[a](b)`"
SPECIALS = set("$^~{}\\&%#_")


def registry(tmp_path, method: str, split: str, tag: str) -> Registry:
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    for m, s in (("simclr", "split1"), (method, split)):
        # a hostile container image (an env var) and device reach the environment table
        rid = reg.create_run(m, s, 10, 2, {"split_sha256": "ab" * 32}, tags=["paper", tag], status="done",
                             device=method, versions={"container_image": method, "torch": split})
        reg.log_probe(rid, "full", 0, 50.0, many=60.0, medium=50.0, few=40.0, std=8.0, per_class=[50.0] * 100)
        for sub in (1, 2, 3):  # 3 of 5 subsets: a note that quotes the method
            reg.log_probe(rid, "100", sub, 45.0)
    reg.create_run(method, split, 11, 2, {}, tags=[tag], status="failed")  # an excluded-runs note
    return reg


def render(tmp_path, fmt, method=NASTY, split=NASTY + "_split", tag="<script>alert(2)</script>"):
    reg = registry(tmp_path, method, split, tag)
    return render_report(reg.runs_frame(), reg.probe_frame(), fmt, "full", TABLES, paper_rows=True)


@pytest.mark.parametrize("fmt", ["term", "markdown", "latex", "html"])
def test_hostile_names_do_not_add_lines(tmp_path, fmt):
    benign = render(tmp_path / "a", fmt, method="mine", split="mysplit", tag="t")
    hostile = render(tmp_path / "b", fmt)
    assert len(hostile.splitlines()) == len(benign.splitlines())
    assert "\r" not in hostile


LATEX_ESCAPES = [r"\textbackslash{}", r"\textasciicircum{}", r"\textasciitilde{}", r"\textless{}",
                 r"\textgreater{}", r"\textbar{}", r"\&", r"\%", r"\$", r"\#", r"\_", r"\{", r"\}",
                 r"$\pm$", r"$\Delta$"]
LATEX_STRUCTURE = {r"\begin{table}[t]", r"\centering", r"\toprule", r"\midrule", r"\bottomrule",
                   r"\end{tabular}", r"\end{table}", ""}


def test_latex_has_no_unescaped_specials(tmp_path):
    tex = render(tmp_path, "latex")
    assert "passwd" in tex  # the name is there, as text
    for line in tex.splitlines():
        if line in LATEX_STRUCTURE or re.fullmatch(r"\\begin\{tabular\}\{l(r+)\}", line):
            continue
        if line.startswith("% "):  # a note: the comment runs to the end of the line, which is its own
            continue
        if line.startswith(r"\caption{"):
            assert line.endswith("}")
            cells = [line[len(r"\caption{"):-1]]
        else:
            assert line.endswith(r" \\"), line
            cells = line[:-3].split(" & ")
            assert len(cells) in (3, 7, 8, 11), line  # Tables 4, 3, 2, 1: no cell split
        for cell in cells:
            for esc in LATEX_ESCAPES:
                cell = cell.replace(esc, "")
            assert not SPECIALS & set(cell), (line, SPECIALS & set(cell))


def test_markdown_has_no_raw_html_and_right_rows(tmp_path):
    md = render(tmp_path, "markdown")
    assert "<script>" not in md and "</script>" not in md and "alert(1)" in md
    tables = [b for b in md.split("\n\n") if b.startswith(("| Method", "| Field"))]
    assert len(tables) == 4
    for i, t in enumerate(tables):
        rows = t.splitlines()
        if i < 2:
            assert len(rows) == 2 + 5  # header, rule, the paper's four methods and the hostile one
        seps = {len(re.findall(r"(?<!\\)\|", r)) for r in rows}
        assert len(seps) == 1, rows  # every row has the header's number of cells
    for line in md.splitlines():
        assert "`" not in line.replace("\\`", "") and "[a](b)" not in line


def test_html_escapes(tmp_path):
    page = render(tmp_path, "html")
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_csv_round_trips_hostile_names(tmp_path):
    reg = registry(tmp_path, NASTY, NASTY + "_split", "<script>alert(2)</script>")
    blocks = [render_report(reg.runs_frame(), reg.probe_frame(), "csv", "full", (t,), paper_rows=True)
              for t in (1, 2)]
    for b in blocks:
        rows = [r for r in csv.reader(io.StringIO(b, newline="")) if r]  # a blank line between blocks
        assert len({len(r) for r in rows}) == 1 and len(rows) == 1 + 5
        assert NASTY in [r[0] for r in rows]


def test_terminal_output_has_no_control_characters(tmp_path):
    text = render(tmp_path, "term", method="ev\x1b[2Jil\x07", split="s\x1b]0;t\x07")
    assert "\x1b" not in text and "\x07" not in text and "\\x1b" in text


def test_html_page_escapes_every_registry_string(tmp_path):
    """The whole page (run sections with configs, errors, tags, the environment) holds hostile
    strings as text: no markup, no attribute or URL they could open."""
    from harness.report_html import render_page

    reg = registry(tmp_path, NASTY, NASTY + "_split", "<script>alert(2)</script>")
    rid = reg.create_run(NASTY, "s", 12, 2, {"note": '"><img src=x onerror=alert(3)>', NASTY: NASTY},
                         status="failed", device='"><b>x</b>', versions={"container_image": "</style><script>"})
    reg.update_run(rid, error="</section><script>alert(4)</script>")
    math = reg.create_run("$\\frac{1$", "split1", 10, 2, {}, status="done")  # mathtext would fail to parse it
    reg.log_epoch(math, 1, loss=3.0)
    reg.log_probe(math, "full", 0, 50.0, many=60.0, medium=50.0, few=40.0, std=8.0, per_class=[50.0] * 100)
    runs = reg.runs_frame()
    page, _ = render_page(runs, reg.probe_frame(), reg.epoch_frame(list(runs["id"])), data_root=tmp_path / "none")
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(3)&gt;", "")
    assert "<img src=x" not in page and "<b>x</b>" not in page
    assert page.count("data:image/png;base64,") == 2  # group bars and training curves, drawn despite the names
    assert page.count("<section") == page.count("</section>") == len(runs)
    assert page.count("</style>") == 1 and "alert(4)" in page  # there, as text


def test_csv_cells_never_start_a_spreadsheet_formula(tmp_path):
    """A method named '=HYPERLINK(...)' is text in a spreadsheet, not a formula; negative numbers
    (a Δ below the paper) stay numbers."""
    reg = registry(tmp_path, "=HYPERLINK(\"http://x\",\"y\")", "@split", "+tag")
    reg.log_probe(reg.create_run("simclr", "split1", 10, 2, {}, status="done"), "full", 0, 40.0)
    text = render_report(reg.runs_frame(), reg.probe_frame(), "csv", "full", (1,))
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert all(not v.startswith(("=", "+", "@")) for r in rows for v in r.values()), text
    assert "'=HYPERLINK(\"http://x\",\"y\")" in [r["method"] for r in rows]
    simclr = next(r for r in rows if r["method"] == "simclr")
    assert float(simclr["full_diff"]) < 0  # 40 against the paper's number: a number, unquoted
