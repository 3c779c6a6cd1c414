"""The paper's tables (and a few plots) from the registry's probe scores.

Table 1: linear-probe top-1 per method for full-shot / 100-shot / 50-shot, mean ± std over
runs, beside the published numbers (only for the paper's dataset and splits). Table 2:
Many / Medium / Few / Std / All for one shot, with the group sizes. Runs are grouped by the
dataset they trained on (recorded with every run): one set of tables per dataset. Everything below `report_command` is a pure function of DataFrames, so the
tables are testable without a database. Only runs with status "done" are averaged in.

pandas is imported inside the functions that build frames, so that `harness.cli` (which
registers `report_command` from here) starts without loading it.
"""
from __future__ import annotations

import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, Sequence

import numpy as np
import typer

if TYPE_CHECKING:  # annotations only; the real import is deferred (see the module docstring)
    import pandas as pd

METHOD_ORDER = ("simclr", "sdclr", "bcl-i", "bcl-d")
METHOD_LABEL = {"simclr": "SimCLR", "sdclr": "SDCLR", "bcl-i": "BCL-I", "bcl-d": "BCL-D"}
SHOTS = ("full", "100", "50")
SHOT_LABEL = {"full": "Full-shot", "100": "100-shot", "50": "50-shot"}
GROUPS = ("many", "medium", "few", "std", "all")
GROUP_LABEL = {"many": "Many", "medium": "Medium", "few": "Few", "std": "Std", "all": "All"}
FORMATS = ("term", "markdown", "csv", "latex", "html")
# Authors' README: pretrained on split 1, one run each, ResNet-18, linear-probe top-1 (%).
PUBLISHED = {
    "simclr": {"full": 50.7, "100": 46.3, "50": 42.4},
    "sdclr": {"full": 55.0, "100": 49.7, "50": 45.6},
    "bcl-i": {"full": 55.7, "100": 50.1, "50": 45.8},
    "bcl-d": {"full": 58.7, "100": 52.6, "50": 48.7},
}
DASH = "—"


# -- selecting and aggregating ---------------------------------------------------------------

def methods_in_order(methods: Sequence[str]) -> list[str]:
    """The paper's four first (always shown), then any other method present, sorted."""
    return list(METHOD_ORDER) + sorted(set(methods) - set(METHOD_ORDER))


def done_only(runs: pd.DataFrame, probes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(done runs, their probe rows, the excluded runs)."""
    done = runs[runs["status"] == "done"]
    return done, probes[probes["run_id"].isin(done["id"])], runs[runs["status"] != "done"]


def run_scores(probes: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, kind): metrics averaged over the run's k-shot subsets (full: one subset).
    Std is recomputed from the averaged group accuracies (population std of the three)."""
    import pandas as pd

    cols = ["run_id", "method", "split", "kind", "top1", "many", "medium", "few", "std", "subsets"]
    if probes.empty:
        return pd.DataFrame(columns=cols)
    p = probes.assign(**{c: pd.to_numeric(probes[c], errors="coerce") for c in ("top1", "many", "medium", "few")})
    g = p.groupby(["run_id", "method", "split", "kind"], sort=True)
    out = g[["top1", "many", "medium", "few"]].mean()
    out["subsets"] = g.size()
    out["std"] = out[["many", "medium", "few"]].std(axis=1, ddof=0, skipna=False)
    return out.reset_index()[cols]


def mean_std(values: pd.Series) -> tuple[float, float, int]:
    """Mean, sample std (ddof 1; NaN for one value) and count of the non-missing values."""
    v = values.dropna().astype(float)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if n > 1 else float("nan"), n


def empty_reason(method: str, runs: pd.DataFrame, done: pd.DataFrame) -> str:
    if not (runs["method"] == method).any():
        return "no runs"
    if not (done["method"] == method).any():
        return "no done runs"
    return "not evaluated"


PAPER_SPLITS = {f"split{k}" for k in range(1, 6)}


def table1_frame(runs: pd.DataFrame, probes: pd.DataFrame, paper_dataset: bool = True,
                 paper_splits_only: bool = True) -> pd.DataFrame:
    """Numeric Table 1: per method and shot the mean, std, n over done runs, the published
    number and the difference; `<shot>_note` says why a cell is empty. `paper_dataset`: the
    runs are on the paper's CIFAR-100; `paper_splits_only`: the report asked for no other split."""
    import pandas as pd

    done, dprobes, _ = done_only(runs, probes)
    scores = run_scores(dprobes)
    table_on_paper = paper_splits_only and set(done["split"]) <= PAPER_SPLITS
    rows = []
    for m in methods_in_order(list(runs["method"]) + list(probes["method"])):
        row: dict = {"method": m}
        for s in SHOTS:
            mean, std, n = mean_std(scores.loc[(scores["method"] == m) & (scores["kind"] == s), "top1"])
            # published numbers are for the paper's CIFAR-100-LT splits; beside other data they mislead.
            # A method without done runs gets them only in a table of nothing but the paper's setting.
            splits_m = set(done.loc[done["method"] == m, "split"])
            on_paper = paper_dataset and (splits_m <= PAPER_SPLITS if splits_m else table_on_paper)
            paper = PUBLISHED.get(m, {}).get(s, float("nan")) if on_paper else float("nan")
            row.update({f"{s}_mean": mean, f"{s}_std": std, f"{s}_n": n, f"{s}_paper": paper,
                        f"{s}_diff": mean - paper, f"{s}_note": "" if n else empty_reason(m, runs, done)})
        rows.append(row)
    return pd.DataFrame(rows)


def table2_frame(runs: pd.DataFrame, probes: pd.DataFrame, shot: str = "full") -> pd.DataFrame:
    """Numeric Table 2 for one shot: Many/Medium/Few/Std/All, mean and std over done runs."""
    import pandas as pd

    done, dprobes, _ = done_only(runs, probes)
    scores = run_scores(dprobes)
    scores = scores[scores["kind"] == shot].rename(columns={"top1": "all"})
    rows = []
    for m in methods_in_order(list(runs["method"]) + list(probes["method"])):
        sel = scores[scores["method"] == m]
        row: dict = {"method": m}
        for gname in GROUPS:
            mean, std, _ = mean_std(sel[gname])
            row.update({f"{gname}_mean": mean, f"{gname}_std": std})
        row["n"] = len(sel)
        row["note"] = "" if len(sel) else empty_reason(m, runs, done)
        if len(sel) and sel["many"].isna().all():
            row["note"] = "no class groups"
        rows.append(row)
    return pd.DataFrame(rows)


def report_notes(runs: pd.DataFrame, probes: pd.DataFrame) -> list[str]:
    """Excluded runs, and done runs whose k-shot probes miss some of the five subsets."""
    notes = []
    _, dprobes, excluded = done_only(runs, probes)
    if len(excluded):
        states = ", ".join(f"{k} {v}" for k, v in excluded["status"].value_counts().sort_index().items())
        ids = ", ".join(str(i) for i in excluded["id"])
        notes.append(f"Excluded {len(excluded)} run(s) whose status is not 'done' ({states}; ids {ids}).")
    other = sorted(set(runs.loc[runs["status"] == "done", "split"]) - PAPER_SPLITS)
    if other:
        notes.append(f"Runs on splits other than the paper's ({', '.join(other)}): no published numbers beside "
                     "their methods.")
    quick = quick_try_runs(runs[runs["status"] == "done"])
    if quick:
        notes.append("Runs off the paper's recipe, averaged in as they are: " + "; ".join(quick) + ".")
    limited = test_limited_runs(dprobes)
    if limited:
        notes.append("Scored on part of the test set (--test-limit), averaged in as they are: "
                     + "; ".join(limited) + ".")
    failed = eval_failed_runs(runs, probes)
    if failed:
        notes.append("Evaluation failed, no scores: " + "; ".join(failed) + ".")
    sc = run_scores(dprobes)
    partial = sc[(sc["kind"] != "full") & (sc["subsets"] < 5)]
    for _, r in partial.iterrows():
        notes.append(f"Run {r['run_id']} ({r['method']}): {r['kind']}-shot averages "
                     f"{r['subsets']} of the 5 subsets.")
    return notes


def _config(v) -> dict:
    return v if isinstance(v, dict) else {}


def test_limited_runs(dprobes: pd.DataFrame) -> list[str]:
    """'#id (200 of 10000 test images)' for runs whose scores come from a --test-limit evaluation."""
    if "config" not in dprobes:
        return []
    out = {}
    for _, p in dprobes.iterrows():
        c = _config(p["config"])
        if c.get("test_limit"):
            out.setdefault(p["run_id"], f"#{p['run_id']} ({c.get('test_images')} of "
                                        f"{c.get('test_images_total')} test images)")
    return [out[k] for k in sorted(out)]


def eval_failed_runs(runs: pd.DataFrame, probes: pd.DataFrame) -> list[str]:
    """Done runs without scores whose last evaluation failed: '#id (the error)'."""
    if "error" not in runs:
        return []
    scored = set(probes["run_id"])
    bad = runs[(runs["status"] == "done") & ~runs["id"].isin(scored)
               & runs["error"].fillna("").astype(str).str.startswith("evaluation failed")]
    return [f"#{r['id']} ({str(r['error'])[len('evaluation failed: '):][:120]})" for _, r in bad.iterrows()]


def quick_try_runs(done: pd.DataFrame) -> list[str]:
    """'#id (width 16, 200 images of the split)' for runs made with the quick-try knobs."""
    out = []
    if "config" not in done:
        return out
    for _, r in done.iterrows():
        cfg = r["config"] if isinstance(r["config"], dict) else {}
        width = (cfg.get("method") or {}).get("width", 64)
        marks = ([f"width {width}"] if width != 64 else []) + \
                ([f"{cfg['subset']} images of the split"] if cfg.get("subset") else [])
        if marks:
            out.append(f"#{r['id']} ({', '.join(marks)})")
    return out


# -- display -------------------------------------------------------------------------------------

def fmt_mean_std(mean: float, std: float) -> str:
    if np.isnan(mean):
        return DASH
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_num(v: float, spec: str = ".1f") -> str:
    return DASH if v is None or np.isnan(v) else format(v, spec)


def table1_display(t1: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["Method"]
    for s in SHOTS:
        headers += [SHOT_LABEL[s], "Paper", "Δ"]
    rows = []
    for _, r in t1.iterrows():
        row = [METHOD_LABEL.get(r["method"], r["method"])]
        for s in SHOTS:
            if r[f"{s}_n"]:
                cell = f"{fmt_mean_std(r[f'{s}_mean'], r[f'{s}_std'])} (n={r[f'{s}_n']})"
            else:
                cell = f"{DASH} ({r[f'{s}_note']})"
            row += [cell, fmt_num(r[f"{s}_paper"]), fmt_num(r[f"{s}_diff"], "+.2f")]
        rows.append(row)
    return headers, rows


def table2_display(t2: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["Method"] + [GROUP_LABEL[g] for g in GROUPS] + ["n"]
    rows = []
    for _, r in t2.iterrows():
        row = [METHOD_LABEL.get(r["method"], r["method"])]
        cells = [fmt_mean_std(r[f"{g}_mean"], r[f"{g}_std"]) for g in GROUPS]
        if r["note"]:  # say why in the first empty cell
            cells[0] = f"{DASH} ({r['note']})"
        rows.append(row + cells + [str(r["n"])])
    return headers, rows


# Every cell, title and note is plain text (user strings such as method and split names
# included); each renderer puts it into its format through that format's one escape function,
# so nothing a user named can add lines, cells, markup or commands to a report.

def visible(s: str) -> str:
    """Control and other invisible characters (newline, CR, ESC, BEL, U+2028, bidi overrides)
    as visible escapes (\\n, \\x1b, ...): a user string stays on its line and cannot drive a terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(s))


def term_escape(s: str) -> str:
    return visible(s)


_MARKDOWN_SUBS = {"<": "&lt;", ">": "&gt;", "&": "&amp;",
                  **{c: "\\" + c for c in "\\`*_[]|~#!"}}


def markdown_escape(s: str) -> str:
    """No raw HTML (< > & as entities), no emphasis, code, links or strikethrough, no cell breaks (|)."""
    return "".join(_MARKDOWN_SUBS.get(ch, ch) for ch in visible(s))


_LATEX_SUBS = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "%": r"\%",
               "#": r"\#", "_": r"\_", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}",
               "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
               "±": r"$\pm$", "Δ": r"$\Delta$", DASH: "---"}


def latex_escape(s: str) -> str:
    """Every LaTeX special as text, one character at a time (so no replacement is escaped twice);
    newlines are already visible escapes, so a note cannot leave its % comment."""
    return "".join(_LATEX_SUBS.get(ch, ch) for ch in visible(s))


def html_escape(s: str) -> str:
    return html.escape(visible(s))


def render_term(title: str, headers: list[str], rows: list[list[str]], notes: list[str]) -> str:
    e = term_escape
    title, headers, rows, notes = e(title), [e(h) for h in headers], [[e(c) for c in r] for r in rows], \
        [e(n) for n in notes]
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [title, line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join(out + notes) + "\n"


def render_markdown(title: str, headers: list[str], rows: list[list[str]], notes: list[str]) -> str:
    e = markdown_escape
    line = lambda cells: "| " + " | ".join(e(c) for c in cells) + " |"
    out = [f"**{e(title)}**", "", line(headers), "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += [line(r) for r in rows]
    if notes:
        out += [""] + [f"- {e(n)}" for n in notes]
    return "\n".join(out) + "\n"


def render_latex(title: str, headers: list[str], rows: list[list[str]], notes: list[str]) -> str:
    e = latex_escape
    line = lambda cells: " & ".join(e(c) for c in cells) + " \\\\"
    out = ["\\begin{table}[t]", "\\centering", f"\\caption{{{e(title)}}}",
           "\\begin{tabular}{l" + "r" * (len(headers) - 1) + "}", "\\toprule", line(headers), "\\midrule"]
    out += [line(r) for r in rows]
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    out += [f"% {e(n)}" for n in notes]
    return "\n".join(out) + "\n"


def render_html(title: str, headers: list[str], rows: list[list[str]], notes: list[str]) -> str:
    e = html_escape
    out = ["<table>", f"<caption>{e(title)}</caption>",
           "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    out += ["</tbody>", "</table>"] + [f"<p>{e(n)}</p>" for n in notes]
    return "\n".join(out) + "\n"


RENDERERS = {"term": render_term, "markdown": render_markdown, "latex": render_latex, "html": render_html}


def render_csv(frame: pd.DataFrame) -> str:
    """Machine-readable numbers (not display strings); empty fields for missing values."""
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.4f", lineterminator="\n")
    return buf.getvalue()


def lt_name(label: str) -> str:
    """'CIFAR-100' -> 'CIFAR-100-LT'; 'cifar100 (not the official CIFAR-100)' -> 'cifar100-LT (not ...)'."""
    name, sep, rest = label.partition(" (")
    return f"{name}-LT{sep}{rest}"


def table1_title(label: str = "CIFAR-100", paper: bool = True) -> str:
    published = ("Paper: authors' README (split 1, one run)" if paper else
                 "no published numbers: the paper reports CIFAR-100-LT on its own splits only")
    return (f"Table 1: linear-probe top-1 accuracy (%) on {lt_name(label)}, mean ± std over done runs "
            f"(few-shot: 5 subsets averaged per run first); {published}")


def table2_title(shot: str, groups: str = "Many 34 / Medium 33 / Few 33 classes", label: str | None = None) -> str:
    on = f" on {lt_name(label)}" if label else ""
    return (f"Table 2: {SHOT_LABEL[shot]} top-1 accuracy (%){on} by class group of the pretraining split "
            f"({groups}; Std: population std of the three), mean ± std over done runs")


# -- datasets: every run records the one it trained on ---------------------------------------------

def run_dataset(config) -> tuple[str, str | None, int]:
    """(name, known dataset, classes) a run trained on; runs from before datasets were recorded
    could only train on CIFAR-100."""
    c = _config(config)
    name = c.get("dataset") if isinstance(c.get("dataset"), str) else None
    if name is None:
        return PAPER_DATASET, PAPER_DATASET, 100
    info = _config(c.get("dataset_info"))
    classes = info.get("classes") if isinstance(info.get("classes"), int) else 100
    return name, info.get("known") if isinstance(info.get("known"), str) else None, classes


PAPER_DATASET = "cifar100"
KNOWN_CLASSES = {"cifar100": 100, "cifar10": 10}


@dataclass
class DatasetGroup:
    name: str
    known: str | None
    classes: int
    runs: pd.DataFrame
    probes: pd.DataFrame

    @property
    def label(self) -> str:
        from harness.data import dataset_label
        return dataset_label(self.name, self.known)

    @property
    def is_paper(self) -> bool:
        return self.name == PAPER_DATASET and self.known == PAPER_DATASET


def dataset_groups(runs: pd.DataFrame, probes: pd.DataFrame, dataset: str | None = None) -> list[DatasetGroup]:
    """The runs (and their probe rows) of each dataset, the paper's first; one empty group when there
    are no runs (the asked --dataset, else the paper's)."""
    keys = [run_dataset(c) for c in runs["config"]] if "config" in runs else [run_dataset(None)] * len(runs)
    if dataset is not None:
        keep = np.array([k[0] == dataset for k in keys], dtype=bool)
        runs, keys = runs[keep], [k for k, ok in zip(keys, keep) if ok]
    if not len(runs):  # an empty table: of the dataset asked for (a known one by its name), or the paper's
        name = dataset or PAPER_DATASET
        known = name if name in KNOWN_CLASSES else None
        return [DatasetGroup(name, known, KNOWN_CLASSES.get(name, 0), runs,
                             probes[probes["run_id"].isin(runs["id"])])]
    by: dict[tuple, list] = {}
    for (name, known, classes), rid in zip(keys, runs["id"]):
        by.setdefault((name, known), [classes, []])[1].append(rid)
    order = sorted(by, key=lambda k: (k != (PAPER_DATASET, PAPER_DATASET), k[0], str(k[1])))
    return [DatasetGroup(k[0], k[1], by[k][0], runs[runs["id"].isin(by[k][1])],
                         probes[probes["run_id"].isin(by[k][1])]) for k in order]


def thirds(classes: int) -> dict[str, int]:
    return {"many": classes - 2 * (classes // 3), "medium": classes // 3, "few": classes // 3}


def group_sizes_text(group: DatasetGroup, shot: str) -> str:
    """'Many 34 / Medium 33 / Few 33 classes' from what the evaluations recorded (runs from before
    they did: thirds of the dataset's classes); each variant with its runs when they differ."""
    done, dprobes, _ = done_only(group.runs, group.probes)
    sel = dprobes[dprobes["kind"] == shot] if len(dprobes) else dprobes
    variants: dict[tuple, set] = {}
    for _, p in sel.iterrows():
        g = _config(_config(p.get("config")).get("groups"))
        sizes = _config(g.get("sizes")) or (thirds(group.classes) if g.get("rule", "thirds") == "thirds" else {})
        if not sizes:
            continue
        rule = ((f"Many > {g['many_above']} / Few < {g['few_below']} images",) if g.get("rule") == "counts" else ())
        variants.setdefault((sizes.get("many"), sizes.get("medium"), sizes.get("few"), *rule), set()).add(p["run_id"])
    if not variants:
        if not group.classes:
            return "Many / Medium / Few: thirds of the classes by count"
        z = thirds(group.classes)
        return f"Many {z['many']} / Medium {z['medium']} / Few {z['few']} classes"

    def one(v) -> str:
        return f"Many {v[0]} / Medium {v[1]} / Few {v[2]} classes" + (f" ({v[3]})" if len(v) > 3 else "")
    if len(variants) == 1:
        return one(next(iter(variants)))
    return "groups differ between runs: " + "; ".join(
        f"{one(v)} in run{'s' if len(ids) > 1 else ''} {', '.join(str(i) for i in sorted(ids))}"
        for v, ids in sorted(variants.items(), key=lambda kv: min(kv[1])))


def render_report(runs: pd.DataFrame, probes: pd.DataFrame, fmt: str = "term", shot: str = "full",
                  tables: Sequence[int] = (1, 2), dataset: str | None = None, split: str | None = None) -> str:
    """The requested tables in one format, one set per dataset (csv: one table, tidy: one header
    line, then its rows; a `dataset` column first when there are several). `dataset` and `split`
    are the report's filters, if any: an empty table still says what it is about."""
    import pandas as pd

    if fmt == "csv" and len(tables) != 1:
        raise ValueError("a CSV file holds one table")
    groups = dataset_groups(runs, probes, dataset)
    paper_splits_only = split is None or split in PAPER_SPLITS
    parts, frames = [], []
    for g in groups:
        notes = report_notes(g.runs, g.probes)
        if not g.is_paper and len(g.runs):
            notes = [n for n in notes if not n.startswith("Runs on splits other than the paper's")]
        for t in tables:
            frame = (table1_frame(g.runs, g.probes, g.is_paper, paper_splits_only) if t == 1
                     else table2_frame(g.runs, g.probes, shot))
            if fmt == "csv":
                frames.append(frame if len(groups) == 1 else frame.assign(dataset=g.label)[["dataset", *frame.columns]])
                continue
            headers, rows = table1_display(frame) if t == 1 else table2_display(frame)
            title = (table1_title(g.label, g.is_paper) if t == 1 else
                     table2_title(shot, group_sizes_text(g, shot), None if g.is_paper else g.label))
            parts.append(RENDERERS[fmt](title, headers, rows, notes))
    if fmt == "csv":
        return render_csv(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0])
    return "\n".join(parts)


# -- plots ---------------------------------------------------------------------------------------

def per_class_points(probes: pd.DataFrame, counts_by_split: dict[str, np.ndarray], shot: str) -> pd.DataFrame:
    """(method, run_id, class, count, acc): each run's per-class accuracy (k-shot: averaged
    over its subsets) against the class's count in that run's pretraining split."""
    import pandas as pd

    recs = []
    sel = probes[(probes["kind"] == shot) & probes["split"].isin(list(counts_by_split))]
    for (run_id, method, split), g in sel.groupby(["run_id", "method", "split"]):
        pcs = [np.asarray(p, dtype=float) for p in g["per_class"] if p is not None and len(p)]
        if not pcs:
            continue
        acc = np.mean(pcs, axis=0)
        for c, (n, a) in enumerate(zip(counts_by_split[split], acc)):
            recs.append({"method": method, "run_id": run_id, "class": c, "count": int(n), "acc": float(a)})
    return pd.DataFrame(recs, columns=["method", "run_id", "class", "count", "acc"])


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def trend_window(classes: int) -> int:
    """Classes in the running mean: a fifth of them (20 of CIFAR-100's 100, 2 of 10, 200 of 1,000)."""
    return max(2, round(classes / 5))


def plot_per_class(points: pd.DataFrame, shot: str, out: Path, label: str | None = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    classes = max(int(points["class"].nunique()), 1)
    size = float(np.clip(600 / classes, 2, 24))  # 6 at 100 classes; bigger dots for few, smaller for many
    for m in methods_in_order(points["method"].unique()):
        p = points[points["method"] == m].sort_values("count")
        if p.empty:
            continue
        dots = ax.scatter(p["count"].clip(lower=1), p["acc"], s=size, alpha=0.25 if classes > 20 else 0.5)
        # running mean over neighbouring classes shows the trend through the scatter
        trend = p["acc"].rolling(trend_window(classes), min_periods=1, center=True).mean()
        ax.plot(p["count"].clip(lower=1), trend, color=dots.get_facecolor()[0][:3], label=METHOD_LABEL.get(m, m),
                marker="o" if classes <= 20 else None, ms=3)
    ax.set(xscale="log", xlabel="images of the class in the pretraining split",
           ylabel=f"{SHOT_LABEL[shot]} per-class accuracy (%)",
           title="Per-class accuracy vs class size" + (f" ({label}, {classes} classes)" if label else ""))
    outside_legend(ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_groups(t2: pd.DataFrame, shot: str, out: Path, subtitle: str | None = None) -> None:
    plt = _pyplot()
    t2 = t2[(t2["n"] > 0) & t2["many_mean"].notna()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(t2), 1)
    x = np.arange(3)
    for i, (_, r) in enumerate(t2.iterrows()):
        means = [r[f"{g}_mean"] for g in ("many", "medium", "few")]
        errs = [0 if np.isnan(r[f"{g}_std"]) else r[f"{g}_std"] for g in ("many", "medium", "few")]
        ax.bar(x + i * width, means, width, yerr=errs, capsize=3, label=METHOD_LABEL.get(r["method"], r["method"]))
    ax.set_xticks(x + width * (len(t2) - 1) / 2, ["Many", "Medium", "Few"])
    ax.set(ylabel=f"{SHOT_LABEL[shot]} accuracy (%)",
           title="Accuracy by class group" + (f"\n{subtitle}" if subtitle else ""))
    outside_legend(ax)  # inside, it covers the bars
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def outside_legend(ax, fontsize: float | None = None) -> None:
    """The legend below the axes, where it never hides data."""
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(len(handles), 4),
                  fontsize=fontsize, frameon=False)


def plot_training(epochs: pd.DataFrame, runs: pd.DataFrame, out: Path) -> None:
    """Loss per epoch for every run; a second panel with the BCL sample-weight quantiles when any
    run logged them. Epoch ticks are whole numbers; short runs get markers (one point is no line)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    weighted = [(rid, e) for rid, e in epochs.groupby("run_id")
                if "weight_q50" in e and e["weight_q50"].notna().any()]
    fig, axes = plt.subplots(1, 2 if weighted else 1, figsize=(12 if weighted else 7, 4.8), squeeze=False)
    ax1 = axes[0][0]
    label = {r["id"]: f"{METHOD_LABEL.get(r['method'], r['method'])} {r['split']} #{r['id']}"
             for _, r in runs.iterrows()}
    for run_id, e in epochs.groupby("run_id"):
        ax1.plot(e["epoch"], e["loss"], lw=1, marker="o" if len(e) <= 20 else None, ms=3,
                 label=label.get(run_id, str(run_id)))
    ax1.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    outside_legend(ax1, fontsize=7)
    if weighted:
        ax2 = axes[0][1]
        for run_id, e in weighted:
            line, = ax2.plot(e["epoch"], e["weight_q50"], lw=1, marker="o" if len(e) <= 20 else None, ms=3,
                             label=f"{label.get(run_id, run_id)} median")
            ax2.fill_between(e["epoch"], e["weight_q10"], e["weight_q90"], color=line.get_color(), alpha=0.15)
            ax2.fill_between(e["epoch"], e["weight_q25"], e["weight_q75"], color=line.get_color(), alpha=0.25)
        ax2.set(xlabel="epoch", ylabel="sample weight w", title="BCL weights (median, 25-75 %, 10-90 %)")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        outside_legend(ax2, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def load_class_counts(splits: Sequence[str], data_root: Path, splits_root: Path | None,
                      dataset: str = PAPER_DATASET) -> tuple[dict, str]:
    """Class counts of each pretraining split, and a message naming what could not be loaded."""
    try:
        from harness import data as data_mod
        from harness import splits as splits_mod
        data = data_mod.load_dataset(data_root, dataset)
        labels = data.train_labels
    except Exception as e:  # missing module or data: the plot is optional
        return {}, f"per-class plot skipped: cannot load the labels of dataset {dataset!r} ({e})"
    counts, missing = {}, []
    for s in splits:
        try:
            splits_mod.check_belongs(s, data)
            idx = splits_mod.load_split(s, splits_root, num_images=len(labels))
            counts[s] = np.bincount(labels[idx], minlength=data.num_classes)
        except Exception as e:
            missing.append(f"{s} ({e})")
    return counts, ("per-class plot: skipped splits " + "; ".join(missing)) if missing else ""


def write_plots(registry, runs: pd.DataFrame, probes: pd.DataFrame, shot: str, folder: Path,
                data_root: Path, splits_root: Path | None, dataset: str | None = None) -> list[str]:
    """PNG files into `folder`, one set per dataset (named after it when there are several);
    returns one message per file written or skipped."""
    groups = dataset_groups(runs, probes, dataset)
    msgs = []
    for g in groups:
        suffix = "" if len(groups) == 1 else f"_{g.name}"
        msgs += [m if len(groups) == 1 else f"{g.name}: {m}"
                 for m in _write_dataset_plots(registry, g, shot, folder, data_root, splits_root, suffix)]
    return msgs


def _write_dataset_plots(registry, group: DatasetGroup, shot: str, folder: Path, data_root: Path,
                         splits_root: Path | None, suffix: str) -> list[str]:
    import pandas as pd

    runs, probes = group.runs, group.probes
    folder.mkdir(parents=True, exist_ok=True)
    done, dprobes, _ = done_only(runs, probes)
    msgs = []
    label = None if group.is_paper else group.label
    counts, msg = load_class_counts(sorted(dprobes["split"].unique()), data_root, splits_root, group.name)
    if msg:
        msgs.append(msg)
    points = per_class_points(dprobes, counts, shot)
    if points.empty:
        have = sorted(set(dprobes["kind"]))
        if shot not in have:
            msgs.append(f"per-class plot skipped: no done run has {SHOT_LABEL[shot].lower()} probe scores"
                        + (f" (they have {', '.join(SHOT_LABEL[k].lower() for k in have)}: try --shot "
                           f"{have[0]})" if have else " (evaluate with `harness eval RUN`)"))
        else:
            msgs.append("per-class plot skipped: the pretraining splits' class counts could not be loaded")
    else:
        path = folder / f"per_class_vs_count_{shot}{suffix}.png"
        plot_per_class(points, shot, path, label)
        msgs.append(f"wrote {path}")
    t2 = table2_frame(runs, probes, shot)
    if (t2["n"] > 0).any() and t2["many_mean"].notna().any():
        path = folder / f"groups_{shot}{suffix}.png"
        plot_groups(t2, shot, path, label and f"{label}: {group_sizes_text(group, shot)}")
        msgs.append(f"wrote {path}")
    else:
        msgs.append("group plot skipped: no group scores")
    ep = registry.epoch_frame(list(done["id"])) if len(done) else pd.DataFrame()
    if ep.empty:
        msgs.append("training curves skipped: no epoch metrics for done runs")
    else:
        path = folder / f"training_curves{suffix}.png"
        plot_training(ep, done, path)
        msgs.append(f"wrote {path}")
    return msgs


# -- command -----------------------------------------------------------------------------------

def report_command(
    shot: Annotated[str, typer.Option("--shot", help="Probe for Table 2 and the plots: full, 100 or 50.")] = "full",
    fmt: Annotated[str, typer.Option("--format", help="term, markdown, csv (numbers, one table per file), "
                                                      "latex or html.")] = "term",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the tables to this file instead of stdout.")] = None,
    plots: Annotated[Optional[Path], typer.Option(
        "--plots", help="Folder for PNG plots: per-class accuracy vs class size, group bars, training curves.")] = None,
    table: Annotated[str, typer.Option("--table", help="Which tables: 1, 2 or all.")] = "all",
    method: Annotated[Optional[str], typer.Option("--method", help="Only runs of this method.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Only runs pretrained on this split.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Only runs with this target epoch count.")] = None,
    tag: Annotated[Optional[str], typer.Option("--tag", help="Only runs carrying this tag.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Only runs on this dataset (default: every "
                                                   "dataset, one set of tables each).")] = None,
    registry: Annotated[Optional[str], typer.Option(
        "--registry", help="SQLAlchemy URL of the result registry (default: $HARNESS_REGISTRY or "
                           "sqlite:///results/registry.db).")] = None,
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder of the datasets (class counts for the "
                                                                "per-class plot).")] = Path("data"),
    splits_root: Annotated[Optional[Path], typer.Option(
        "--splits-root", help="Folder of the paper's split files (default: $HARNESS_SPLITS or splits/paper).")] = None,
) -> None:
    """Print the paper's tables from the registry's probe scores.

    Table 1: top-1 per shot beside the published numbers (for the paper's
    CIFAR-100 splits only). Table 2: Many/Medium/Few/Std/All for one shot
    (--shot), with the group sizes. One set of tables per dataset; only runs
    with status 'done' count.
    """
    from harness.errors import HarnessError
    from harness.registry import Registry

    def fail(message: str) -> None:
        raise HarnessError(message)

    if shot not in SHOTS:
        fail(f"unknown --shot {shot!r}; one of {', '.join(SHOTS)}")
    if fmt not in FORMATS:
        fail(f"unknown --format {fmt!r}; one of {', '.join(FORMATS)}")
    tables = {"1": (1,), "2": (2,), "all": (1, 2)}.get(table)
    if tables is None:
        fail(f"unknown --table {table!r}; one of 1, 2, all")
    filters = dict(method=method, split=split, epochs=epochs, tag=tag)
    reg = Registry(registry)
    runs, probes = reg.runs_frame(**filters), reg.probe_frame(**filters)
    if fmt == "csv" and len(tables) > 1:  # tidy CSV: one table per file
        if out is None:
            fail("CSV holds one table per file: give --table 1 or --table 2, or --out FILE.csv for "
                 "FILE_table1.csv and FILE_table2.csv")
        targets = [(t, out.with_name(f"{out.stem}_table{t}{out.suffix or '.csv'}")) for t in tables]
    else:
        targets = [(None, out)]
    for t, path in targets:
        text = render_report(runs, probes, fmt, shot, (t,) if t else tables, dataset=dataset, split=split)
        if path is None:
            typer.echo(text, nl=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)  # an OSError becomes one line in the CLI
            path.write_text(text)
            typer.echo(f"wrote {path}", err=True)
    if fmt == "csv":  # notes stay out of the machine-readable output
        for g in dataset_groups(runs, probes, dataset):
            for n in report_notes(g.runs, g.probes):
                typer.echo(n, err=True)
    if plots is not None:
        for msg in write_plots(reg, runs, probes, shot, plots, data_root, splits_root, dataset):
            typer.echo(msg, err=True)
