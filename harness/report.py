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

from harness.data import PAPER_DATASET

if TYPE_CHECKING:  # annotations only; the real import is deferred (see the module docstring)
    import pandas as pd

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

def methods_in_order(methods: Sequence[str], paper_rows: bool = False) -> list[str]:
    """The rows: the methods present, in the method registry's order (each base method, then its BCL
    wrappings), with `paper_rows` the paper's four too, even without runs; then any method that no
    installed package registers (kept, by name)."""
    from methods import registry

    present = {m for m in methods if isinstance(m, str)}
    keep = present | (set(registry.paper_names()) if paper_rows else set())
    return [e.name for e in registry.ordered(keep)] + sorted(present - set(registry.entries()))


def method_label(method: str) -> str:
    """The method's display name from the method registry (an unregistered one keeps its name)."""
    from methods import registry

    return registry.display_name(method)


def done_only(runs: pd.DataFrame, probes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(done runs, their probe rows, the excluded runs)."""
    done = runs[runs["status"] == "done"]
    return done, probes[probes["run_id"].isin(done["id"])], runs[runs["status"] != "done"]


def run_scores(probes: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, kind): metrics averaged over the run's k-shot subsets (full: one subset).
    Std is recomputed from the averaged group accuracies (population std of the three)."""
    import pandas as pd

    cols = ["run_id", "method", "split", "seed", "kind", "top1", "many", "medium", "few", "std", "subsets"]
    if probes.empty:
        return pd.DataFrame(columns=cols)
    p = probes.assign(**{c: pd.to_numeric(probes[c], errors="coerce") for c in ("top1", "many", "medium", "few")})
    if "seed" not in p:
        p = p.assign(seed=-1)
    g = p.groupby(["run_id", "method", "split", "seed", "kind"], sort=True)
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


def over_splits(sel: pd.DataFrame, col: str) -> dict:
    """One method's per-run scores (`sel`: run_scores rows) summarised the way the tables show them:
    each split's runs (its seeds) averaged first, then mean and sample std over the splits; `seed_sd`
    is the spread over seeds within a split (pooled: root mean of the per-split variances), NaN when
    no split has two seeds. `n` counts runs, `splits` splits."""
    v = sel[["split", "seed", col]].dropna(subset=[col])
    v = v.assign(**{col: v[col].astype(float)})
    if v.empty:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "splits": 0, "seed_sd": float("nan")}
    per_split = v.groupby("split")[col]
    mean, std, n_splits = mean_std(per_split.mean())
    variances = per_split.var(ddof=1).dropna()
    seed_sd = float(np.sqrt(variances.mean())) if len(variances) else float("nan")
    return {"mean": mean, "std": std, "n": len(v), "splits": n_splits, "seed_sd": seed_sd}


def id_list(ids) -> str:
    """Run ids as one plain field ("1 2 5"): sortable, splittable, no CSV quoting."""
    return " ".join(str(int(i)) for i in sorted(set(ids)))


def empty_reason(method: str, runs: pd.DataFrame, done: pd.DataFrame) -> str:
    if not (runs["method"] == method).any():
        return "no runs"
    if not (done["method"] == method).any():
        return "no done runs"
    return "not evaluated"


PAPER_SPLITS = {f"split{k}" for k in range(1, 6)}


def table1_frame(runs: pd.DataFrame, probes: pd.DataFrame, paper_rows: bool = False,
                 paper_dataset: bool = True, paper_splits_only: bool = True) -> pd.DataFrame:
    """Numeric Table 1: per method and shot the mean and std over splits (seeds averaged per split
    first; `<shot>_seed_sd` their spread), n runs and splits, the published number and the difference;
    `<shot>_note` says why a cell is empty; `runs` the ids of the done runs averaged in; `paper_dataset`: the runs are on
    the paper's CIFAR-100; `paper_splits_only`: the report asked for no other split."""
    import pandas as pd

    done, dprobes, _ = done_only(runs, probes)
    scores = run_scores(dprobes)
    table_on_paper = paper_splits_only and set(done["split"]) <= PAPER_SPLITS
    rows = []
    for m in methods_in_order(list(runs["method"]) + list(probes["method"]), paper_rows):
        row: dict = {"method": m}
        for s in SHOTS:
            a = over_splits(scores[(scores["method"] == m) & (scores["kind"] == s)], "top1")
            # published numbers are for the paper's CIFAR-100-LT splits; beside other data they mislead.
            # A method without done runs gets them only in a table of nothing but the paper's setting.
            splits_m = set(done.loc[done["method"] == m, "split"])
            on_paper = paper_dataset and (splits_m <= PAPER_SPLITS if splits_m else table_on_paper)
            paper = PUBLISHED.get(m, {}).get(s, float("nan")) if on_paper else float("nan")
            row.update({f"{s}_mean": a["mean"], f"{s}_std": a["std"], f"{s}_n": a["n"],
                        f"{s}_splits": a["splits"], f"{s}_seed_sd": a["seed_sd"], f"{s}_paper": paper,
                        f"{s}_diff": a["mean"] - paper, f"{s}_note": "" if a["n"] else empty_reason(m, runs, done)})
        row["runs"] = id_list(scores.loc[scores["method"] == m, "run_id"])
        rows.append(row)
    return pd.DataFrame(rows)


def table2_frame(runs: pd.DataFrame, probes: pd.DataFrame, shot: str = "full",
                 paper_rows: bool = False) -> pd.DataFrame:
    """Numeric Table 2 for one shot: Many/Medium/Few/Std/All, mean and std over splits (as in Table 1).
    Std is the paper's balancedness measure (population std of the three group accuracies of a run);
    `std_std` is its spread over splits."""
    import pandas as pd

    done, dprobes, _ = done_only(runs, probes)
    scores = run_scores(dprobes)
    scores = scores[scores["kind"] == shot].rename(columns={"top1": "all"})
    rows = []
    for m in methods_in_order(list(runs["method"]) + list(probes["method"]), paper_rows):
        sel = scores[scores["method"] == m]
        row: dict = {"method": m}
        for gname in GROUPS:
            a = over_splits(sel, gname)
            row.update({f"{gname}_mean": a["mean"], f"{gname}_std": a["std"]})
        row["n"] = len(sel)
        row["runs"] = id_list(sel["run_id"])
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
    resumed = resumed_runs(runs[runs["status"] == "done"])
    if resumed:
        notes.append(f"Resumed after a stop: {len(resumed)} of the done runs ("
                     + ", ".join(f"#{i}: {k}x" for i, k in resumed.items()) + "); a resume continues exactly.")
    notes += [f"Deviation from the authors' recipe: {d}." for d in recipe_deviations(runs, probes)]
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


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def test_limited_runs(dprobes: pd.DataFrame) -> list[str]:
    """'#id (200 of 10000 test images)' for runs whose scores come from a --test-limit evaluation."""
    if "config" not in dprobes:
        return []
    out = {}
    for _, p in dprobes.iterrows():
        c = _dict(p["config"])
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


# -- how the numbers were obtained: deviations, resumes, cost, environment -------------------------

def run_ids_text(ids) -> str:
    """'#1-#3, #7': run ids, consecutive ones as ranges."""
    ids = sorted(set(int(i) for i in ids))
    parts, start = [], None
    for i, rid in enumerate(ids):
        if start is None:
            start = rid
        if i + 1 == len(ids) or ids[i + 1] != rid + 1:
            parts.append(f"#{start}" if start == rid else f"#{start}-#{rid}")
            start = None
    return ", ".join(parts)


def resumed_runs(runs: pd.DataFrame) -> dict[int, int]:
    """{run id: times resumed} of the runs whose versions record resumes."""
    if "versions" not in runs:
        return {}
    out = {}
    for _, r in runs.iterrows():
        k = len(_dict(r["versions"]).get("resumes") or [])
        if k:
            out[int(r["id"])] = k
    return out


def run_precision(run) -> str | None:
    """The precision a run trained in: recorded at its start, else what 'auto' meant on its device."""
    recorded = _dict(run.get("versions")).get("precision")
    if recorded:
        return recorded
    asked = _dict(run.get("config")).get("precision")
    if asked in ("bf16", "fp32"):
        return asked
    if asked == "auto" and _present(run.get("device")):
        return "fp32" if str(run["device"]).startswith("cpu") else "bf16"
    return None


# method settings the authors' recipe fixes (SPEC 5), and for which methods each one matters
_NOT_RECIPE = ("name", "seed")  # a run's identity, not its recipe
_FIELD_WORDS = {"epochs": "{v} epochs instead of {d}", "batch_size": "batch {v} instead of {d}",
                "width": "ResNet-18 width {v} instead of {d}", "lr": "lr {v} instead of {d}",
                "weight_decay": "weight decay {v} instead of {d}"}
_PROBE_FIELDS = ("epochs", "lr", "final_lr", "weight_decay", "batch_size")


def _paper_probe() -> dict:
    try:
        from harness.probe import ProbeConfig
    except ImportError:  # pragma: no cover - torch missing: no probe comparison
        return {}
    d = ProbeConfig()
    return {k: getattr(d, k) for k in _PROBE_FIELDS}


def _paper_recipe(method: str) -> dict | None:
    try:
        from methods.base import default_config
        return default_config(method).to_dict()
    except (ImportError, ValueError):  # a method the paper has no recipe for
        return None


def run_deviations(run, probe_configs: Sequence[dict] = ()) -> list[str]:
    """What one run did differently from the authors' recipe, in words, from its own recorded config
    (nothing for a setting the run did not record)."""
    cfg = _dict(run.get("config"))
    method_cfg = _dict(cfg.get("method"))
    out = []
    paper = _paper_recipe(str(run["method"])) if method_cfg else None
    for name, d in (paper or {}).items():  # the shared recipe and the method's own options (--set)
        if name in _NOT_RECIPE or name not in method_cfg:
            continue
        v = method_cfg[name]
        if v != d:
            out.append(_FIELD_WORDS.get(name, name.replace("_", " ") + " {v} instead of {d}").format(v=v, d=d))
    if cfg.get("subset"):
        out.append(f"trained on {cfg['subset']} images of the split (a seeded subset), not all of it")
    prec = run_precision(run) if method_cfg else None
    if prec == "bf16":
        out.append("bf16 autocast instead of fp32")
    paper_probe = _paper_probe()
    for pc in probe_configs:
        pc = _dict(pc)
        for name, d in paper_probe.items():
            if name in pc and pc[name] != d:
                out.append(f"probe {name.replace('_', ' ')} {pc[name]} instead of {d}")
        if pc.get("bf16"):
            out.append("probe features in bf16 instead of fp32")
    return list(dict.fromkeys(out))  # once each, in order


def recipe_deviations(runs: pd.DataFrame, probes: pd.DataFrame) -> list[str]:
    """'<deviation> (runs #1-#4)' for every deviation any done run has, from the runs' own configs."""
    done = runs[runs["status"] == "done"]
    by_run = {}
    if "config" in probes:
        for rid, g in probes.groupby("run_id"):
            by_run[rid] = list(g["config"])
    seen: dict[str, list[int]] = {}
    for _, r in done.iterrows():
        for d in run_deviations(r, by_run.get(r["id"], ())):
            seen.setdefault(d, []).append(int(r["id"]))
    return [f"{d} ({'run' if len(ids) == 1 else 'runs'} {run_ids_text(ids)})" for d, ids in seen.items()]


def epoch_speed(epochs: pd.DataFrame | None) -> dict[int, float]:
    """{run id: median images/s over its epochs}."""
    if epochs is None or epochs.empty or "images_per_s" not in epochs:
        return {}
    e = epochs.dropna(subset=["images_per_s"])
    return {int(k): float(v) for k, v in e.groupby("run_id")["images_per_s"].median().items()}


def on_cpu(device) -> bool | None:
    """True/False for a known device string, None when the run did not record one."""
    if not _present(device):
        return None
    return str(device).startswith("cpu")


def cost_frame(runs: pd.DataFrame, epochs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Numeric Table 3 (cost), one row per method with runs and one for all: done runs, wall time per
    done run (mean, std), GPU- and CPU-hours spent by every run (failed and interrupted ones too),
    images/s (median over a run's epochs, mean over done runs), and the done runs' ids."""
    import pandas as pd

    speed = epoch_speed(epochs)
    rows = []
    groups = [(m, runs[runs["method"] == m]) for m in methods_in_order(runs["method"]) if (runs["method"] == m).any()]
    for label, sel in groups + ([("all", runs)] if len(groups) else []):
        done = sel[sel["status"] == "done"]
        wall = pd.to_numeric(done["wall_time_s"], errors="coerce")
        mean, std, n = mean_std(wall)
        kind = sel["device"].map(on_cpu) if "device" in sel else pd.Series([None] * len(sel), index=sel.index)
        spent = pd.to_numeric(sel["wall_time_s"], errors="coerce").fillna(0.0)
        speeds = [speed[i] for i in done["id"] if i in speed]
        rows.append({"method": label, "runs_done": n, "runs_all": len(sel), "wall_mean_s": mean, "wall_std_s": std,
                     "gpu_hours": float(spent[kind.map(lambda c: c is False)].sum()) / 3600,  # None: unknown
                     "cpu_hours": float(spent[kind.map(lambda c: c is True)].sum()) / 3600,
                     "unknown_device_runs": int(kind.isna().sum()),
                     "images_per_s": float(np.mean(speeds)) if speeds else float("nan"),
                     "runs": id_list(done["id"])})
    return pd.DataFrame(rows, columns=["method", "runs_done", "runs_all", "wall_mean_s", "wall_std_s", "gpu_hours",
                                       "cpu_hours", "unknown_device_runs", "images_per_s", "runs"])


NOT_RECORDED = "not recorded"
NA_CPU = "n/a (CPU)"
# Table 4's fields, in order: keys of a run's start or resume record (its versions, device and git_rev)
ENV_FIELDS = ("device", "driver", "cuda", "cudnn", "torch", "torchvision", "python", "precision", "commit",
              "container_image")
ENV_LABEL = {"device": "GPU / device", "driver": "GPU driver", "cuda": "CUDA", "cudnn": "cuDNN", "torch": "torch",
             "torchvision": "torchvision", "python": "Python", "precision": "precision", "commit": "commit",
             "container_image": "container image", "split": "split digest"}


def _present(v) -> bool:
    """A recorded value: not None, not a pandas NaN, not empty."""
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and v != ""


def env_value(record: dict, field: str, cpu: bool | None) -> str:
    """One environment field of a start or resume record (versions plus device and git_rev)."""
    if field == "commit":
        rev = record.get("git_rev")
        return str(rev)[:12] if _present(rev) else NOT_RECORDED
    if field in ("driver", "cuda", "cudnn") and cpu:
        return NA_CPU
    if field == "container_image" and field in record and not _present(record[field]):
        return "none"  # recorded: the run was not in a container
    v = record.get(field)
    return str(v) if _present(v) else NOT_RECORDED


def environment_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Numeric Table 4 (environment) of the done runs: per field every value seen, at the run's start
    or any resume, with the ids of the runs that had it ("not recorded" for runs older than the field);
    then the digest of each split's indices as the runs recorded it."""
    import pandas as pd

    done = runs[runs["status"] == "done"]
    rows = []
    for field in ENV_FIELDS:
        seen: dict[str, list[int]] = {}
        for _, r in done.iterrows():
            versions = _dict(r.get("versions"))
            start = {**versions, "device": r.get("device"), "git_rev": r.get("git_rev")}
            if field == "precision":
                start["precision"] = run_precision(r)
            for rec in [start] + [_dict(x) for x in versions.get("resumes") or []]:
                value = env_value(rec, field, on_cpu(rec.get("device")))
                ids = seen.setdefault(value, [])
                if int(r["id"]) not in ids:
                    ids.append(int(r["id"]))
        for value, ids in sorted(seen.items(), key=lambda kv: (kv[0] == NOT_RECORDED, kv[0])):
            rows.append({"field": field, "value": value, "runs": id_list(ids)})
    for split in sorted(set(done["split"])):
        seen = {}
        for _, r in done[done["split"] == split].iterrows():
            digest = _dict(r.get("config")).get("split_sha256")
            value = f"{split}: {digest[:16]}…" if isinstance(digest, str) and digest else f"{split}: {NOT_RECORDED}"
            seen.setdefault(value, []).append(int(r["id"]))
        for value, ids in seen.items():
            rows.append({"field": "split", "value": value, "runs": id_list(ids)})
    return pd.DataFrame(rows, columns=["field", "value", "runs"])


def cost_notes(cost: pd.DataFrame) -> list[str]:
    notes = ["Wall time: training only (probes not included); GPU- and CPU-hours: every run's training time, "
             "failed and interrupted runs included, one device per run."]
    total = cost[cost["method"] == "all"]
    if len(total) and total.iloc[0]["unknown_device_runs"]:
        notes.append(f"{total.iloc[0]['unknown_device_runs']} run(s) recorded no device: in neither total.")
    return notes


def environment_notes(env: pd.DataFrame) -> list[str]:
    notes = []
    for field in ENV_FIELDS:
        values = env.loc[(env["field"] == field) & ~env["value"].isin([NOT_RECORDED, NA_CPU]), "value"]
        if len(values) > 1:
            notes.append(f"{ENV_LABEL[field]} differs between runs (or between a run's start and its resumes).")
    digests = env.loc[(env["field"] == "split") & ~env["value"].str.endswith(NOT_RECORDED), "value"]
    split_names = digests.str.rsplit(":", n=1).str[0]
    for name in sorted(set(split_names[split_names.duplicated()])):
        notes.append(f"Runs on {name} recorded different digests of its indices: they trained on different images.")
    return notes


# -- display -------------------------------------------------------------------------------------

def fmt_mean_std(mean: float, std: float) -> str:
    if np.isnan(mean):
        return DASH
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_num(v: float, spec: str = ".1f") -> str:
    return DASH if v is None or np.isnan(v) else format(v, spec)


def runs_cell(ids: str) -> str:
    """The Runs column: the row's run ids ("#1-#3, #7"), or a dash."""
    return run_ids_text(ids.split()) if isinstance(ids, str) and ids.strip() else DASH


def table1_display(t1: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["Method"]
    for s in SHOTS:
        headers += [SHOT_LABEL[s], "Paper", "Δ"]
    headers.append("Runs")
    rows = []
    for _, r in t1.iterrows():
        row = [method_label(r["method"])]
        for s in SHOTS:
            if r[f"{s}_n"]:
                seeds = r.get(f"{s}_seed_sd", float("nan"))
                extra = "" if np.isnan(seeds) else f"; seeds ± {seeds:.2f}"
                cell = f"{fmt_mean_std(r[f'{s}_mean'], r[f'{s}_std'])} (n={r[f'{s}_n']}{extra})"
            else:
                cell = f"{DASH} ({r[f'{s}_note']})"
            row += [cell, fmt_num(r[f"{s}_paper"]), fmt_num(r[f"{s}_diff"], "+.2f")]
        rows.append(row + [runs_cell(r.get("runs", ""))])
    return headers, rows


STD_HEADER = "Std (balance)"  # the paper's balancedness measure, not a spread over runs


def table2_display(t2: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["Method"] + [STD_HEADER if g == "std" else GROUP_LABEL[g] for g in GROUPS] + ["n", "Runs"]
    rows = []
    for _, r in t2.iterrows():
        row = [method_label(r["method"])]
        cells = [fmt_mean_std(r[f"{g}_mean"], r[f"{g}_std"]) for g in GROUPS]
        if r["note"]:  # say why in the first empty cell
            cells[0] = f"{DASH} ({r['note']})"
        rows.append(row + cells + [str(r["n"]), runs_cell(r.get("runs", ""))])
    return headers, rows


def fmt_duration(seconds: float) -> str:
    if seconds is None or np.isnan(seconds):
        return DASH
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def cost_display(cost: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["Method", "Done runs", "Wall time per run", "GPU-hours", "CPU-hours", "images/s", "Runs"]
    rows = []
    for _, r in cost.iterrows():
        wall = fmt_duration(r["wall_mean_s"])
        if not np.isnan(r["wall_std_s"]):
            wall += f" ± {fmt_duration(r['wall_std_s'])}"
        rows.append(["All" if r["method"] == "all" else method_label(r["method"]),
                     f"{r['runs_done']} of {r['runs_all']}", wall, f"{r['gpu_hours']:.2f}", f"{r['cpu_hours']:.2f}",
                     fmt_num(r["images_per_s"], ",.0f"), runs_cell(r["runs"])])
    return headers, rows


def environment_display(env: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["Field", "Value", "Runs"]
    return headers, [[ENV_LABEL.get(r["field"], r["field"]), r["value"], runs_cell(r["runs"])]
                     for _, r in env.iterrows()]


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


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v):
    """A text cell that a spreadsheet would run as a formula (=, +, -, @ first) gets a leading quote;
    numbers stay numbers."""
    return "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v


def render_csv(frame: pd.DataFrame) -> str:
    """Machine-readable numbers (not display strings); empty fields for missing values; no text cell
    that a spreadsheet would evaluate."""
    buf = io.StringIO()
    text = [c for c in frame.columns if frame[c].dtype.kind not in "biufc"]  # not numbers or booleans
    safe = frame.assign(**{c: frame[c].map(csv_cell) for c in text})
    safe.to_csv(buf, index=False, float_format="%.4f", lineterminator="\n")
    return buf.getvalue()


def lt_name(label: str) -> str:
    """'CIFAR-100' -> 'CIFAR-100-LT'; 'cifar100 (not the official CIFAR-100)' -> 'cifar100-LT (not ...)'."""
    name, sep, rest = label.partition(" (")
    return f"{name}-LT{sep}{rest}"


def table1_title(label: str = "CIFAR-100", paper: bool = True) -> str:
    published = ("Paper: authors' README (split 1, one run)" if paper else
                 "no published numbers: the paper reports CIFAR-100-LT on its own splits only")
    return (f"Table 1: linear-probe top-1 accuracy (%) on {lt_name(label)}, mean ± std over splits of done runs "
            "(a split's seeds averaged first, their spread as 'seeds ±'; few-shot: 5 subsets averaged per run "
            f"first); n: runs; {published}")


def table2_title(shot: str, groups: str = "Many 34 / Medium 33 / Few 33 classes", label: str | None = None) -> str:
    on = f" on {lt_name(label)}" if label else ""
    return (f"Table 2: {SHOT_LABEL[shot]} top-1 accuracy (%){on} by class group of the pretraining split "
            f"({groups}), mean ± std over splits of done runs; Std (balance): the "
            "paper's balancedness measure, the population std of a run's three group accuracies (lower is more "
            "balanced), not a spread over runs")


def table3_title(label: str | None = None) -> str:
    return "Table 3: cost of the runs (training), per method and in all" + (f", {lt_name(label)}" if label else "")


def table4_title(label: str | None = None) -> str:
    return ("Table 4: environment of the done runs, as each run recorded it at its start and at every resume"
            + (f", {lt_name(label)}" if label else ""))


TABLES = (1, 2, 3, 4)  # the paper's two tables, cost, environment


# -- datasets: every run records the one it trained on ---------------------------------------------

def run_dataset(config) -> tuple[str, str | None, int]:
    """(name, known dataset, classes) a run trained on; runs from before datasets were recorded
    could only train on CIFAR-100."""
    c = _dict(config)
    name = c.get("dataset") if isinstance(c.get("dataset"), str) else None
    if name is None:
        return PAPER_DATASET, PAPER_DATASET, 100
    info = _dict(c.get("dataset_info"))
    classes = info.get("classes") if isinstance(info.get("classes"), int) else 100
    return name, info.get("known") if isinstance(info.get("known"), str) else None, classes


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
    """Group sizes of the paper's rule at `classes` classes (the rule itself lives in harness.groups)."""
    from harness.groups import group_sizes
    return group_sizes(np.zeros(classes, dtype=int))


def group_sizes_text(group: DatasetGroup, shot: str) -> str:
    """'Many 34 / Medium 33 / Few 33 classes' from what the evaluations recorded (runs from before
    they did: thirds of the dataset's classes); each variant with its runs when they differ."""
    done, dprobes, _ = done_only(group.runs, group.probes)
    sel = dprobes[dprobes["kind"] == shot] if len(dprobes) else dprobes
    variants: dict[tuple, set] = {}
    for _, p in sel.iterrows():
        g = _dict(_dict(p.get("config")).get("groups"))
        sizes = _dict(g.get("sizes")) or (thirds(group.classes) if g.get("rule", "thirds") == "thirds" else {})
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


def table_frame(t: int, group: DatasetGroup, shot: str, epochs: pd.DataFrame | None,
                paper_rows: bool = False, paper_splits_only: bool = True) -> pd.DataFrame:
    runs, probes = group.runs, group.probes
    if t == 1:
        return table1_frame(runs, probes, paper_rows and group.is_paper, group.is_paper, paper_splits_only)
    if t == 2:
        return table2_frame(runs, probes, shot, paper_rows and group.is_paper)
    if t == 3:
        return cost_frame(runs, epochs)
    return environment_frame(runs)


def table_parts(t: int, frame: pd.DataFrame, shot: str, notes: list[str],
                group: DatasetGroup) -> tuple[str, list[str], list[list[str]], list[str]]:
    """(title, headers, rows, notes) of table `t` of one dataset for display."""
    label = None if group.is_paper else group.label
    if t == 1:
        return (table1_title(group.label, group.is_paper), *table1_display(frame), notes)
    if t == 2:
        return (table2_title(shot, group_sizes_text(group, shot), label), *table2_display(frame), notes)
    if t == 3:
        return (table3_title(label), *cost_display(frame), cost_notes(frame))
    return (table4_title(label), *environment_display(frame), environment_notes(frame))


@dataclass
class ReportTable:
    group: DatasetGroup
    number: int
    frame: pd.DataFrame
    parts: tuple  # (title, headers, rows, notes)


def report_tables(runs: pd.DataFrame, probes: pd.DataFrame, shot: str = "full", tables: Sequence[int] = (1, 2),
                  epochs: pd.DataFrame | None = None, paper_rows: bool = False, dataset: str | None = None,
                  split: str | None = None) -> list[ReportTable]:
    """The requested tables, one set per dataset (the paper's first). `dataset` and `split` are the
    report's filters, if any: an empty table still says what it is about."""
    paper_splits_only = split is None or split in PAPER_SPLITS
    out = []
    for g in dataset_groups(runs, probes, dataset):
        notes = report_notes(g.runs, g.probes)
        if not g.is_paper and len(g.runs):
            notes = [n for n in notes if not n.startswith("Runs on splits other than the paper's")]
        for t in tables:
            frame = table_frame(t, g, shot, epochs, paper_rows, paper_splits_only)
            out.append(ReportTable(g, t, frame, table_parts(t, frame, shot, notes, g)))
    return out


def render_report(runs: pd.DataFrame, probes: pd.DataFrame, fmt: str = "term", shot: str = "full",
                  tables: Sequence[int] = (1, 2), epochs: pd.DataFrame | None = None,
                  paper_rows: bool = False, dataset: str | None = None, split: str | None = None) -> str:
    """The requested tables in one format, one set per dataset (csv: one table, tidy: one header
    line, then its rows; a `dataset` column first when there are several). `epochs` (the registry's
    epoch frame) gives Table 3 its images/s; `paper_rows`: the paper's four methods have rows even
    without runs (else only methods with runs)."""
    import pandas as pd

    if fmt == "csv" and len(tables) != 1:
        raise ValueError("a CSV file holds one table")
    made = report_tables(runs, probes, shot, tables, epochs, paper_rows, dataset, split)
    if fmt == "csv":
        several = len({id(r.group) for r in made}) > 1
        frames = [r.frame.assign(dataset=r.group.label)[["dataset", *r.frame.columns]] if several else r.frame
                  for r in made]
        return render_csv(pd.concat(frames, ignore_index=True) if several else frames[0])
    return "\n".join(RENDERERS[fmt](*r.parts) for r in made)


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


def plot_label(s: str) -> str:
    """A user string as a legend label: visible escapes for control characters, and no $ that would
    start matplotlib's mathtext (a method named '$\\frac$' must not break the plot)."""
    return visible(s).replace("$", r"\$")


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
        ax.plot(p["count"].clip(lower=1), trend, color=dots.get_facecolor()[0][:3], label=plot_label(method_label(m)),
                marker="o" if classes <= 20 else None, ms=3)
    ax.set(xscale="log", xlabel="images of the class in the pretraining split",
           ylabel=f"{SHOT_LABEL[shot]} per-class accuracy (%)",
           title="Per-class accuracy vs class size" + (f"\n{plot_label(label)}, {classes} classes" if label else ""))
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
        ax.bar(x + i * width, means, width, yerr=errs, capsize=3, label=plot_label(method_label(r["method"])))
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
    label = {r["id"]: plot_label(f"{method_label(r['method'])} {r['split']} #{r['id']}")
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


def weight_by_class_points(epochs: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """(method, run_id, epoch, class, count, weight): each BCL run's mean sample weight per class at the
    last epoch that logged it, against the class's count in what the run trained on (its config)."""
    import pandas as pd

    cols = ["method", "run_id", "epoch", "class", "count", "weight"]
    recs = []
    if epochs is None or epochs.empty or "extra" not in epochs:
        return pd.DataFrame(columns=cols)
    info = {int(r["id"]): r for _, r in runs.iterrows()}
    for run_id, e in epochs.groupby("run_id"):
        r = info.get(int(run_id))
        counts = _dict(r.get("config")).get("class_counts") if r is not None else None
        logged = [(ep, x["weight_by_class"]) for ep, x in zip(e["epoch"], e["extra"])
                  if isinstance(x, dict) and x.get("weight_by_class")]
        if not logged or not counts:
            continue
        epoch, weights = max(logged, key=lambda t: t[0])
        for c, (n, w) in enumerate(zip(counts, weights)):
            if w is not None and n:
                recs.append({"method": r["method"], "run_id": int(run_id), "epoch": int(epoch), "class": c,
                             "count": int(n), "weight": float(w)})
    return pd.DataFrame(recs, columns=cols)


def plot_weight_by_class(points: pd.DataFrame, out) -> None:
    """BCL's mean sample weight per class against the class's size: the tail should weigh more."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods_in_order(points["method"].unique()):
        p = points[points["method"] == m].sort_values("count")
        if p.empty:
            continue
        dots = ax.scatter(p["count"], p["weight"], s=6, alpha=0.3)
        trend = p.groupby("count")["weight"].mean().rolling(10, min_periods=1, center=True).mean()
        ax.plot(trend.index, trend.values, color=dots.get_facecolor()[0][:3], label=plot_label(method_label(m)))
    ax.set(xscale="log", xlabel="images of the class in the pretraining split",
           ylabel="mean BCL sample weight w (last logged epoch)", title="BCL weight vs class size")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 5, 50, not 2 x 10^0
    ax.xaxis.set_major_formatter(plain)
    if len(points) and points["count"].max() < 20 * points["count"].min():  # under a decade or so: label minors
        ax.xaxis.set_minor_formatter(plain)
    outside_legend(ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120, format="png")
    plt.close(fig)


def recorded_class_counts(runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """{split: class counts} as runs recorded them at their start (runs on a --subset are skipped)."""
    out: dict[str, np.ndarray] = {}
    for _, r in runs.iterrows():
        cfg = _dict(r.get("config"))
        if cfg.get("class_counts") and not cfg.get("subset") and r["split"] not in out:
            out[r["split"]] = np.asarray(cfg["class_counts"], dtype=int)
    return out


def class_counts_for(runs: pd.DataFrame, splits: Sequence[str], data_root: Path,
                     splits_root: Path | None, dataset: str = PAPER_DATASET) -> tuple[dict, str]:
    """Class counts of each split: recorded with the runs, else from the data and split files."""
    counts = {k: v for k, v in recorded_class_counts(runs).items() if k in splits}
    missing = [s for s in splits if s not in counts]
    if not missing:
        return counts, ""
    loaded, msg = load_class_counts(missing, data_root, splits_root, dataset)
    return {**counts, **loaded}, msg


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
    counts, msg = class_counts_for(done, sorted(dprobes["split"].unique()), data_root, splits_root, group.name)
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
    if len(t2) and (t2["n"] > 0).any() and t2["many_mean"].notna().any():
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
    weights = weight_by_class_points(ep, done)
    if weights.empty:
        msgs.append("BCL weight plot skipped: no done BCL run logged per-class weights")
    else:
        path = folder / f"bcl_weight_vs_count{suffix}.png"
        plot_weight_by_class(weights, path)
        msgs.append(f"wrote {path}")
    return msgs


# -- command -----------------------------------------------------------------------------------

def report_command(
    shot: Annotated[str, typer.Option("--shot", help="Probe for Table 2 and the plots: full, 100 or 50.")] = "full",
    fmt: Annotated[str, typer.Option("--format", help="term, markdown, csv (numbers, one table per file), "
                                                      "latex, or html (one self-contained page: tables, plots, "
                                                      "every run).")] = "term",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the tables to this file instead of stdout.")] = None,
    plots: Annotated[Optional[Path], typer.Option(
        "--plots", help="Folder for PNG plots: per-class accuracy vs class size, group bars, training curves.")] = None,
    table: Annotated[str, typer.Option("--table", help="Which tables: 1, 2, 3 (cost), 4 (environment) "
                                                       "or all.")] = "all",
    method: Annotated[Optional[str], typer.Option("--method", help="Only runs of this method ({methods}).")] = None,
    paper_rows: Annotated[bool, typer.Option("--paper-rows", help="Also show the paper's four methods "
                                             "({paper_methods}) when they have no runs; by default only "
                                             "methods with runs have rows.")] = False,
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
    (--shot), with the group sizes. Table 3: cost (wall time, GPU-hours,
    images/s). Table 4: the environment the runs recorded. One set of tables
    per dataset. Only runs with status 'done' are averaged in; footnotes
    count the others and list every deviation from the authors' recipe.
    Rows: the methods with runs, in the method registry's order (each base
    method, then its BCL wrappings), by report name.
    """
    from harness.errors import HarnessError
    from harness.registry import Registry

    def fail(message: str) -> None:
        raise HarnessError(message)

    if shot not in SHOTS:
        fail(f"unknown --shot {shot!r}; one of {', '.join(SHOTS)}")
    if fmt not in FORMATS:
        fail(f"unknown --format {fmt!r}; one of {', '.join(FORMATS)}")
    tables = {**{str(t): (t,) for t in TABLES}, "all": TABLES}.get(table)
    if tables is None:
        fail(f"unknown --table {table!r}; one of {', '.join(map(str, TABLES))}, all")
    filters = dict(method=method, split=split, epochs=epochs, tag=tag)
    reg = Registry(registry)
    runs, probes = reg.runs_frame(**filters), reg.probe_frame(**filters)
    # per-epoch rows: images/s for Table 3, the page's training curves
    epoch_rows = reg.epoch_frame([int(i) for i in runs["id"]]) if len(runs) and (3 in tables or fmt == "html") else None
    if fmt == "html":  # one page: the tables, the plots, every run's own section
        from harness.report_html import render_page

        checkpoints = {int(i): ck for i in runs["id"] if (ck := reg.latest_checkpoint(int(i)))}
        page, msgs = render_page(runs, probes, epoch_rows, shot, tables, data_root, splits_root, checkpoints,
                                 source=reg._safe_url(), paper_rows=paper_rows, dataset=dataset, split=split)
        for msg in msgs:
            typer.echo(msg, err=True)
        if out is None:
            typer.echo(page, nl=False)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(page, encoding="utf-8")
            typer.echo(f"wrote {out}", err=True)
        if plots is not None:
            for msg in write_plots(reg, runs, probes, shot, plots, data_root, splits_root, dataset):
                typer.echo(msg, err=True)
        return
    if fmt == "csv" and len(tables) > 1:  # tidy CSV: one table per file
        if out is None:
            fail("CSV holds one table per file: give --table 1, 2, 3 or 4, or --out FILE.csv for "
                 "FILE_table1.csv ... FILE_table4.csv")
        targets = [(t, out.with_name(f"{out.stem}_table{t}{out.suffix or '.csv'}")) for t in tables]
    else:
        targets = [(None, out)]
    for t, path in targets:
        text = render_report(runs, probes, fmt, shot, (t,) if t else tables, epochs=epoch_rows, paper_rows=paper_rows,
                             dataset=dataset, split=split)
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
