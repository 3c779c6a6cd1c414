"""`harness bench` on CPU: tiny settings, said so, every figure present and consistent."""
import json

from typer.testing import CliRunner

from harness.bench import REFERENCE, BenchSettings, format_bench, run_bench
from harness.cli import app


def test_cpu_bench_runs_tiny_and_says_so(tmp_path):
    logs = []
    r = run_bench(BenchSettings(methods=("simclr", "bcl-d"), data_root=str(tmp_path / "none"), device="cpu"),
                  log=logs.append)
    assert r["tiny"] and any("tiny settings" in m for m in logs) and r["width"] == 16
    assert r["compute_limit_img_s"] > 0
    for m in r["methods"]:
        assert m["seconds_per_epoch"] > 0
        assert abs(m["images_per_s"] * m["seconds_per_epoch"] - m["images"]) < 1e-6 * m["images"]
        # nothing that compares tiny CPU figures with the H200 reference or projects a paper run
        assert m["projected_2000_epochs_min"] is None and "speedup_vs_reference" not in m
        assert len(m["losses"]) == 2  # one warm-up and one timed epoch, logged like a real run
    assert r["probes"]["probes"] == 11 and r["probes"]["probe_seconds"] > 0
    text = format_bench(r)
    assert "TINY CPU SETTINGS" in text and "BCL-D / SimCLR epoch time" in text
    for meaningless in ("speed-up", "of limit", "2000 ep", "reference"):
        assert meaningless not in text
    assert r["targets"] == [] and "targets" not in text  # tiny CPU figures are not judged


def test_full_size_bench_table_compares_with_the_reference():
    m = {"method": "simclr", "images": 9754, "seconds_per_epoch": 0.39, "images_per_s": 25_000,
         "image_passes_per_s": 50_000, "projected_2000_epochs_min": 13.0, "peak_memory_gb": 9.0,
         "ratio_to_limit": 0.58, "reference_seconds_per_epoch": 3.3, "speedup_vs_reference": 8.46}
    r = {"device": "NVIDIA H200", "precision": "bf16", "compile": False, "batch_size": 512, "tiny": False,
         "split": "1", "compute_limit_img_s": 86_000.0, "methods": [m],
         "probes": {"feature_seconds": 0.5, "probe_seconds": 2.0, "probes": 11, "probe_epochs": 500}}
    text = format_bench(r)
    assert "speed-up" in text and "8.5x" in text and "58%" in text and "13.0 m" in text


def test_targets_judge_each_figure():
    from harness.bench import target_rows

    def judged(simclr_s, bcld_s, compile, limit, probe_s):
        m = lambda name, sec: {"method": name, "seconds_per_epoch": sec, "image_passes_per_s": 19_508 / sec}
        r = {"compile": compile, "compute_limit_img_s": limit, "methods": [m("simclr", simclr_s), m("bcl-d", bcld_s)],
             "probes": {"probe_seconds": probe_s - 0.5, "feature_seconds": 0.5, "probe_epochs": 500}}
        return {t["key"]: t for t in target_rows(r)}

    rows = judged(0.3, 0.39, True, 100_000, 3)
    assert all(t["met"] for t in rows.values()) and len(rows) == 4  # 0.39 s x 2000 + 3 s = 13.05 min
    assert "65% of 100,000 img/s (measured here)" in rows["simclr_share"]["value"]
    assert rows["bcld_ratio"]["value"] == "1.30x"
    rows = judged(0.45, 0.623, False, 60_000, 31)
    assert not any(t["met"] for t in rows.values())
    assert "reference H200" in rows["simclr_share"]["value"]  # 43.4k of the reference's compiled 92.1k



def test_bench_command_writes_json(tmp_path, monkeypatch):
    import harness.bench as bench

    fake = {"device": "NVIDIA H200", "precision": "bf16", "compile": False, "batch_size": 512, "tiny": False,
            "split": "tiny", "compute_limit_img_s": 100.0, "reference": REFERENCE,
            "methods": [{"method": "simclr", "images": 256, "steps_per_epoch": 4, "seconds_per_epoch": 10.0,
                         "images_per_s": 25.6, "image_passes_per_s": 51.2, "projected_2000_epochs_min": 333.3,
                         "peak_memory_gb": None, "ratio_to_limit": 0.512, "reference_seconds_per_epoch": 3.3,
                         "speedup_vs_reference": 0.33, "losses": [6.0, 5.9],
                         "profile": {"steps": 4, "wall_ms_per_step": 20.0, "device_ms_per_step": 15.0,
                                     "phases": {"augment": {"calls_per_step": 1.0, "host_ms": 0.5,
                                                            "device_ms": 3.9}}}}],
            "probes": {"feature_seconds": 1.0, "probe_seconds": 2.0, "probes": 11, "probe_epochs": 10},
            "targets": [{"key": "bcld_ratio", "target": "BCL-D epoch <= 1.3x SimCLR's", "met": False,
                         "value": "1.58x"}]}
    monkeypatch.setattr(bench, "run_bench", lambda s, log: fake)
    out = tmp_path / "b.json"
    res = CliRunner().invoke(app, ["bench", "--methods", "simclr", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["methods"][0]["seconds_per_epoch"] == 10.0
    assert "51%" in res.output and "0.3x" in res.output
    assert "[NOT met] BCL-D epoch <= 1.3x SimCLR's: 1.58x" in res.output
    assert "augment" in res.output and "3.90" in res.output and "kernels 15.00 ms (75% of wall" in res.output


def test_bench_rejects_unknown_compile_mode():
    res = CliRunner().invoke(app, ["bench", "--device", "cpu", "--compile", "--compile-mode", "fast"])
    assert res.exit_code == 1 and "choose one of default, reduce-overhead" in res.output
