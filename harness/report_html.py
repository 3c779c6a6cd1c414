"""`harness report --format html`: one self-contained page (UTF-8, no scripts, no network).

The page holds the tables of harness/report.py with every Runs cell linking to the runs' own
sections, the footnotes, the plots as PNG data URIs (per-class accuracy and BCL weight against
class size, group bars, training curves) and one section per run: its status, times, environment,
deviations from the authors' recipe, probe scores, checkpoint and config. A Content-Security-Policy
allows nothing but inline styles and data: images, so a page that tried to load anything would say
so in the browser's console. Every string from the registry goes through `report.html_escape`.
"""
from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from harness import report as rp

if TYPE_CHECKING:
    import pandas as pd

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 1em 0; }
caption { text-align: left; font-weight: 600; padding-bottom: .4em; max-width: 60em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; }
.notes { font-size: .92em; color: #444; } .skipped { color: #855; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
section.run { border-top: 1px solid #ccc; margin-top: 1.5em; }
section.run:target { background: #fffbe6; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; } dt { font-weight: 600; }
code { font-size: .92em; } details { margin: .5em 0; }
"""
e = rp.html_escape


def data_uri(draw: Callable, *args) -> str:
    """A plot drawn by `draw(*args, out)` as a PNG data URI."""
    buf = io.BytesIO()
    draw(*args, buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def run_links(ids: str) -> str:
    """Runs cell: each id a link to the run's own section."""
    if not isinstance(ids, str) or not ids.split():
        return e(rp.DASH)
    return " ".join(f'<a href="#run-{int(i)}">#{int(i)}</a>' for i in ids.split())


def table_html(title: str, headers: list[str], rows: list[list[str]], notes: list[str],
               links: Sequence[str] | None = None, table_id: str = "", text_cols: Sequence[int] = ()) -> str:
    """One table; with `links`, the last column of row i becomes the run links of links[i]."""
    if links is not None:
        text_cols = (*text_cols, len(headers) - 1)
    cls = lambda j: ' class="text"' if j in text_cols else ""
    out = [f'<table id="{e(table_id)}">' if table_id else "<table>", f"<caption>{e(title)}</caption>",
           "<thead><tr>" + "".join(f"<th{cls(j)}>{e(h)}</th>" for j, h in enumerate(headers)) + "</tr></thead>",
           "<tbody>"]
    for i, r in enumerate(rows):
        cells = [f"<td{cls(j)}>{e(c)}</td>" for j, c in enumerate(r)]
        if links is not None:
            cells[-1] = f'<td class="text">{run_links(links[i])}</td>'
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    if notes:
        out.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(out)


def tables_html(made: Sequence[rp.ReportTable]) -> str:
    """The tables, one set per dataset; Tables 1 and 2 of a dataset share their footnotes."""
    groups = list(dict.fromkeys(id(r.group) for r in made))
    parts = []
    for r in made:
        g = groups.index(id(r.group))
        mine = [x.number for x in made if x.group is r.group]
        shared_at = max((t for t in mine if t in (1, 2)), default=None)
        title, headers, rows, tnotes = r.parts
        if r.number in (1, 2) and r.number != shared_at:
            tnotes = []
        text_cols = (0, 1) if r.number == 4 else (0,)
        anchor = f"table{r.number}" + (f"-{g + 1}" if g else "")  # ids from positions, never from user names
        parts.append(table_html(title, headers, rows, tnotes, list(r.frame["runs"]), anchor, text_cols))
    return "\n".join(parts)


def figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{e(alt)}"><figcaption>{e(caption)}</figcaption></figure>'


def figures_html(runs: pd.DataFrame, probes: pd.DataFrame, epochs: pd.DataFrame | None, shot: str,
                 data_root: Path, splits_root: Path | None, dataset: str | None = None) -> tuple[str, list[str]]:
    """The plots of each dataset as <figure>s; a plot that cannot be drawn is a line saying why (also
    returned)."""
    groups = rp.dataset_groups(runs, probes, dataset)
    parts, msgs = [], []
    for g in groups:
        if len(groups) > 1:
            parts.append(f"<h3>{e(rp.lt_name(g.label))}</h3>")
        html, m = dataset_figures_html(g, epochs, shot, data_root, splits_root)
        parts.append(html)
        msgs += [x if len(groups) == 1 else f"{g.name}: {x}" for x in m]
    return "\n".join(parts), msgs


def dataset_figures_html(group: rp.DatasetGroup, epochs: pd.DataFrame | None, shot: str, data_root: Path,
                         splits_root: Path | None) -> tuple[str, list[str]]:
    """The plots as <figure>s; a plot that cannot be drawn is a line saying why (also returned)."""
    runs, probes = group.runs, group.probes
    label = None if group.is_paper else group.label
    done, dprobes, _ = rp.done_only(runs, probes)
    parts, msgs = [], []
    counts, msg = rp.class_counts_for(done, sorted(dprobes["split"].unique()), data_root, splits_root,
                                        group.name)
    points = rp.per_class_points(dprobes, counts, shot)
    if msg:
        msgs.append(msg)
    if points.empty:
        if not msg:
            msgs.append(f"per-class plot skipped: no done run has {rp.SHOT_LABEL[shot].lower()} per-class scores")
    else:
        parts.append(figure(data_uri(partial(rp.plot_per_class, label=label), points, shot), "per-class accuracy vs class size",
                            f"{rp.SHOT_LABEL[shot]} per-class accuracy of every done run against the class's "
                            "images in its pretraining split (dots), with a running mean per method."))
    t2 = rp.table2_frame(runs, probes, shot)
    if (t2["n"] > 0).any() and t2["many_mean"].notna().any():
        parts.append(figure(data_uri(partial(rp.plot_groups, subtitle=label and f"{label}: {rp.group_sizes_text(group, shot)}"), t2, shot), "accuracy by class group",
                            "Many / Medium / Few accuracy per method (error bars: std over splits)."))
    else:
        msgs.append("group plot skipped: no group scores")
    ep = epochs[epochs["run_id"].isin(done["id"])] if epochs is not None and not epochs.empty else None
    if ep is None or ep.empty:
        msgs.append("training curves skipped: no epoch metrics for done runs")
    else:
        parts.append(figure(data_uri(rp.plot_training, ep, done), "training curves",
                            "Training loss per epoch of every done run; BCL runs: the sample weights' median "
                            "and 25-75 % / 10-90 % bands."))
    weights = rp.weight_by_class_points(ep, done) if ep is not None else rp.weight_by_class_points(None, done)
    if weights.empty:
        msgs.append("BCL weight plot skipped: no done BCL run logged per-class weights")
    else:
        parts.append(figure(data_uri(rp.plot_weight_by_class, weights), "BCL weight vs class size",
                            "Mean BCL sample weight of each class at the last logged epoch against the class's "
                            "images in the pretraining split."))
    parts += [f'<p class="skipped">{e(m)}</p>' for m in msgs]
    return "\n".join(parts), msgs


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return rp.DASH
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(v)


def flat(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested config as (dotted key, value) pairs; long lists shortened."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += flat(v, key + ".")
        elif isinstance(v, (list, tuple)) and len(v) > 8:
            out.append((key, f"[{len(v)} values]"))
        else:
            out.append((key, _fmt(v)))
    return out


def dl(pairs: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in pairs) + "</dl>"


def run_section(run, probes: pd.DataFrame, checkpoint: dict | None) -> str:
    rid = int(run["id"])
    versions = rp._dict(run.get("versions"))
    label = rp.method_label(run["method"])
    head = f"Run #{rid}: {label} on {run['split']}, seed {run['seed']}, {run['status']}"
    facts = [("status", str(run["status"])), ("epochs", f"{run['epochs_done']} of {run['epochs']}"),
             ("wall time", rp.fmt_duration(float(run["wall_time_s"] or 0.0))),
             ("started", _fmt(run.get("started_at"))), ("finished", _fmt(run.get("finished_at"))),
             ("tags", ", ".join(run["tags"]) if isinstance(run["tags"], list) and run["tags"] else rp.DASH)]
    if rp._present(run.get("error")):
        facts.append(("error", str(run["error"])))
    cpu = rp.on_cpu(run.get("device"))
    start = {**versions, "device": run.get("device"), "git_rev": run.get("git_rev"),
             "precision": rp.run_precision(run)}
    facts += [(rp.ENV_LABEL[f], rp.env_value(start, f, cpu)) for f in rp.ENV_FIELDS]
    digest = rp._dict(run.get("config")).get("split_sha256")
    facts.append(("split digest", digest or rp.NOT_RECORDED))
    if checkpoint:
        facts.append(("checkpoint", f"{checkpoint['path']} (epoch {_fmt(checkpoint.get('epoch'))}, "
                                    f"sha256 {str(checkpoint.get('sha256') or rp.NOT_RECORDED)[:16]})"))
    mine = probes[probes["run_id"] == rid] if len(probes) else probes
    order = {k: i for i, k in enumerate(rp.SHOTS)}
    mine = mine.assign(_o=mine["kind"].map(order)).sort_values(["_o", "subset"]) if len(mine) else mine
    devs = rp.run_deviations(run, list(mine["config"]) if "config" in mine else ())
    parts = [f'<section class="run" id="run-{rid}">', f"<h3>{e(head)}</h3>", dl(facts)]
    parts.append("<p>Deviations from the authors' recipe: " + (e("; ".join(devs)) if devs else "none recorded")
                 + "</p>")
    for k, res in enumerate(versions.get("resumes") or [], start=1):
        res = rp._dict(res)
        parts.append(f"<p>Resume {k}: {e(_fmt(res.get('at')))}, after epoch {e(_fmt(res.get('epoch')))}, on "
                     f"{e(_fmt(res.get('device')))}, commit {e(str(res.get('git_rev') or rp.NOT_RECORDED)[:12])}</p>")
    if len(mine):
        headers = ["Probe", "Subset", "Top-1", "Top-5", "Many", "Medium", "Few", rp.STD_HEADER]
        rows = [[rp.SHOT_LABEL.get(p["kind"], p["kind"]), str(p["subset"])]
                + [rp.fmt_num(p[c] if p[c] is not None else float("nan"), ".2f")
                   for c in ("top1", "top5", "many", "medium", "few", "std")] for _, p in mine.iterrows()]
        parts.append(table_html(f"Probe scores of run #{rid}", headers, rows, []))
    else:
        parts.append("<p>No probe scores.</p>")
    cfg = rp._dict(run.get("config"))
    if cfg:
        parts.append("<details><summary>Config</summary>" + dl(flat(cfg)) + "</details>")
    parts.append("</section>")
    return "\n".join(parts)


def render_page(runs: pd.DataFrame, probes: pd.DataFrame, epochs: pd.DataFrame | None, shot: str = "full",
                tables: Sequence[int] = rp.TABLES, data_root: Path = Path("data"), splits_root: Path | None = None,
                checkpoints: dict[int, dict] | None = None, source: str = "", paper_rows: bool = False,
                dataset: str | None = None, split: str | None = None) -> tuple[str, list[str]]:
    """The whole page, and one message per plot that was skipped."""
    figures, msgs = figures_html(runs, probes, epochs, shot, data_root, splits_root, dataset)
    made = rp.report_tables(runs, probes, shot, tables, epochs, paper_rows, dataset, split)
    checkpoints = checkpoints or {}
    sections = [run_section(r, probes, checkpoints.get(int(r["id"]))) for _, r in runs.iterrows()]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = "BCL harness report"
    page = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{e(title)}</h1>",
        f"<p>Generated {e(when)}{' from ' + e(source) if source else ''}: {len(runs)} run(s) in the registry "
        "selection. Every Runs cell links to the runs' own sections below.</p>",
        '<nav><a href="#tables">Tables</a> · <a href="#plots">Plots</a> · <a href="#runs">Runs</a></nav>',
        '<h2 id="tables">Tables</h2>', tables_html(made),
        '<h2 id="plots">Plots</h2>', figures,
        '<h2 id="runs">Runs</h2>', *(sections or ["<p>No runs.</p>"]),
        "</body>", "</html>", "",
    ]
    return "\n".join(page), msgs
