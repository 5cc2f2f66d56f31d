"""report.html: one self-contained page, checked in a real browser (headless Chromium) where one is installed."""

import json
import re
import shutil
import subprocess
from html import escape, unescape

import numpy as np
import pytest
from matplotlib import image

from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.report.collect import collect
from cifarbench.report.html import curve_svg, log_tail
from cifarbench.report.tables import default_tables, summarize, to_frame
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import write_manifest
from cifarbench.store.scan import load_runs, read_records

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)"
)


def chromium(tmp_path, *args) -> str:
    """Chromium, headless, on its own profile folder (tests may run it side by side); returns stdout."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def spec(model: str, seed: int = 0) -> RunSpec:
    return RunSpec(model=model, dataset="cifar10", recipe=get_recipe("step-200"), batch_size=64, seed=seed)


def grid_of_runs(write_records, tmp_path):
    """Completed runs of two models on two datasets, a failed run with its job log, and a run with a manifest and
    a log but no record (lost), submitted from a grid file."""
    results = write_records(
        [
            {"model": m, "dataset": d, "seed": s, "final_test_acc": 0.9 - 0.02 * s, "slurm_job_id": "4242"}
            for m in ("resnet20", "resnet56")
            for d in ("cifar10", "cifar100")
            for s in range(2)
        ]
        + [
            {
                "model": "resnet32",
                "status": "failed",
                "final_test_acc": None,
                "test_acc": [0.1, 0.3],
                "epochs_done": 2,
                "error": "RuntimeError: <script>alert('x')</script> & out of memory",
                "traceback": "Traceback (most recent call last):\n  File fit.py\nRuntimeError: out of memory",
            }
        ]
    )
    logs = Layout(results).logs
    logs.mkdir()
    entries = []
    for run in (spec("resnet32"), spec("resnet44")):
        (logs / f"{run.model}.err").write_text("".join(f"line {i}\n" for i in range(100)) + f"{run.model} died\n")
        (logs / f"{run.model}.out").write_text("starting\n")
        entries.append(
            {
                "run_id": run.run_id,
                "job_id": "4243_0",
                "array_job_id": "4243",
                "array_index": 0,
                "stdout": str(logs / f"{run.model}.out"),
                "stderr": str(logs / f"{run.model}.err"),
                "spec": run.to_dict(),
            }
        )
    (Layout(results).run_dir(spec("resnet44").run_id)).mkdir()
    grid = tmp_path / "grid.yaml"
    grid.write_text("results: results\nmodels: [resnet32, resnet44]  # <the grid>\n")
    write_manifest(results, "slurm", str(grid), entries)
    return results


def test_report_html_is_self_contained_and_complete(write_records, tmp_path):
    results = grid_of_runs(write_records, tmp_path)
    report = collect(results)
    page = Layout(results).report
    assert page in report.written
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text)  # nothing to fetch
    assert "<script" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; out of memory" in text
    assert text.count("data:image/png;base64,") == 3  # the curves of the table, one size plot per dataset
    assert "<svg" in text
    assert "line 99\nresnet32 died" in text and "line 50" not in text  # the tail of the failed run's log
    assert "resnet44 died" in text  # the lost run's
    assert "models: [resnet32, resnet44]  # &lt;the grid&gt;" in text  # the grid file, kept in the manifest
    assert "4242_" not in text and ">4242<" in text  # SLURM job of the completed runs (no array task)
    assert "RuntimeError: out of memory" in text  # the failed run's traceback, from its record
    cached = load_runs(Layout(results).runs_table, results)  # read once, then kept for the next collect
    assert all(cached.column("details_read").to_pylist()) and set(cached.column("hostname").to_pylist()) == {"node01"}


@pytest.mark.slow
@needs_chromium
def test_report_html_renders_in_headless_chromium(write_records, tmp_path):
    results = grid_of_runs(write_records, tmp_path)
    collect(results)
    url = Layout(results).report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1400,2400", url)
    pixels = image.imread(shot)
    assert pixels.shape[:2] == (2400, 1400)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100  # text, tables, plots: not a blank or single-colour page

    dom = chromium(tmp_path, "--dump-dom", url)
    found = read_records(results)
    runs = to_frame(found.table.drop_columns("test_acc"))
    for table in default_tables(summarize(runs)[0]):
        assert escape(table.title) in dom
        for cell in [*table.header, *(c for row in table.body for c in row)]:
            assert f">{escape(cell)}<" in dom
    for run_id in (spec("resnet32").run_id, spec("resnet44").run_id):
        assert run_id in dom
    assert "cifarbench results" in dom and "9 runs: 8 completed, 1 failed." in dom


@needs_chromium
def test_report_html_with_no_completed_run(write_records, tmp_path):
    results = write_records(
        [
            {
                "model": m,
                "status": "failed",
                "final_test_acc": None,
                "test_acc": [0.1],
                "epochs_done": 1,
                "error": "boom",
            }
            for m in ("resnet20", "resnet56")
        ]
    )
    collect(results)
    text = Layout(results).report.read_text()
    assert "data:image/png" not in text and "No plots" in text
    dom = chromium(tmp_path, "--dump-dom", Layout(results).report.resolve().as_uri())
    assert "2 runs: 0 completed, 2 failed." in dom
    for model in ("resnet20", "resnet56"):
        assert spec(model).run_id in dom


def test_report_html_shows_device_hours_and_time_estimates(write_records):
    ids = [spec("resnet20", s).run_id for s in (0, 1)]
    results = write_records(
        [
            {
                "model": "resnet20",
                "seed": s,
                "pack_size": 2,
                "packed_with": [i for i in ids if i != ids[s]],
                "alloc_gpus": 1,
                "alloc_cpus": 8,
                "wall_seconds": 3600.0 - 600 * s,
                "estimated_s": 3000.0,
                "time_limit_s": 5400,
                "estimate_source": "bench: lightning fit rows",
            }
            for s in (0, 1)
        ]
    )
    collect(results, plots=False)
    text = Layout(results).report.read_text()
    hours = text.split('<section id="hours">', 1)[1].split("</section>", 1)[0]
    assert "<h2>Device-hours</h2>" in hours and "<code>submit</code>" in hours
    assert '<td>the results folder</td><td class="num">2</td><td class="num">1.00 GPU-h</td>' in hours  # not 2.00
    timing = text.split('<section id="timing">', 1)[1].split("</section>", 1)[0]
    assert '<td>bench</td><td class="num">1</td><td class="num">1.20</td>' in timing
    assert '<td>pack of 2</td><td class="num">1</td><td class="num">50.0</td>' in timing


def wide_runs(write_records):
    """Runs as a GPU cluster leaves them: a run alone, a pack of 2 sharing a GPU through MPS, a fused pair, a
    cancelled run; long device, host and version names, a commit, requeued attempts, SLURM array tasks."""
    env = {
        "device_name": "NVIDIA H100 80GB HBM3",
        "hostname": "gpu-node-0173.hpc.cluster.example.org",
        "torch_version": "2.6.0+cu124",
        "torchvision_version": "0.21.0+cu124",
        "lightning_version": "2.5.1.post0",
        "cuda_version": "12.4",
        "cifarbench_version": "0.1.0.dev12+g3f2a9c1",
        "git_commit": "3f2a9c1d0b7e5a6c8d9e0f1a2b3c4d5e6f7a8b9c",
        "slurm_job_id": "123456789",
        "slurm_array_task_id": "1234",
        "attempts": 3,
        "alloc_gpus": 1,
        "alloc_cpus": 16,
        "precision_used": "bf16-mixed",
    }
    packed = [spec("resnet20", s).run_id for s in (1, 2)]
    fused = [spec("resnet56", s).run_id for s in (0, 1)]
    return write_records(
        [{"model": "resnet20", "seed": 0, "images_per_s": 41234.0, **env}]
        + [{"model": "resnet20", "seed": s, "pack_size": 2, "packed_with": [i for i in packed if i != packed[s - 1]],
            "mps": "on", "images_per_s": 30000.0, **env} for s in (1, 2)]
        + [{"model": "resnet56", "seed": s, "fuse_size": 2, "fused_with": [i for i in fused if i != fused[s]],
            "images_per_s": 9000.0, **env} for s in (0, 1)]
        + [{"model": "resnet110", "status": "failed", "final_test_acc": None, "test_acc": [0.1], "epochs_done": 1,
            "error": "Cancelled: the job received SIGTERM (scancel, a requeue, or the node shutting down)", **env}]
    )  # fmt: skip


def test_report_html_shows_packing_fusion_and_images_per_s(write_records):
    results = wide_runs(write_records)
    collect(results, plots=False)
    text = Layout(results).report.read_text()
    runs = text.split('<section id="runs">', 1)[1].split("</section>", 1)[0]
    head, inner = (re.findall(r"<th>([^<]*)</th>", part) for part in runs.split("</thead>")[:2])
    assert head == ["configuration", "runs", "test acc: final, best", "test accuracy per epoch", "its runs"]
    assert inner == ["run id", "status", "seed", "epochs", "test acc: final, best", "trained", "images/s",
                     "device, precision, host", "SLURM job, attempts", "versions, commit"]  # fmt: skip
    # one row per configuration, its runs folded beneath it, its curve the mean of its completed runs'
    assert "<h2>Runs (6 runs of 3 configurations)</h2>" in runs and runs.count('<table class="members">') == 3
    assert "<td>3 of 3 completed</td>" in runs and "<td>0 of 1 completed<br>1 cancelled</td>" in runs
    assert runs.count("<summary>3 runs</summary>") == 1 and "<title>mean of 3 runs" in runs
    assert runs.count("<td>pack of 2<br>MPS on</td>") == 2 and runs.count("<td>fused 2</td>") == 2
    assert runs.count("<td>alone</td>") == 2  # the run alone, and the cancelled one
    assert '<td class="num">41234</td>' in runs and runs.count('<td class="num">30000</td>') == 2
    assert "<td>123456789_1234<br>3 attempts</td>" in runs and "commit <code>3f2a9c1d0b7e</code>" in runs
    assert '<td class="num">0.9000<br><span class="foot">best 0.9000</span></td>' in runs
    assert '<tr class="cancelled">' in runs and "<td>cancelled</td>" in runs
    packing = text.split('<section id="packing">', 1)[1].split("</section>", 1)[0]
    assert "<h2>Packing and fusion</h2>" in packing
    assert "<td>pack of 2</td><td>on</td>" in packing and "<td>fused 2</td><td>–</td>" in packing
    assert '<td class="num">60000</td><td class="num">1.46×</td>' in packing  # 2 × 30000 over 41234 alone


# Measures the page as Chromium lays it out: the page's width, and the Runs table's right edge against its section's.
_MEASURE = """<script>
const runs = document.querySelector("table.runs"), box = runs.closest("section");
document.body.dataset.fit = JSON.stringify({page: document.documentElement.scrollWidth, window: innerWidth,
  table: runs.getBoundingClientRect().right, box: box.getBoundingClientRect().right,
  hidden: box.scrollWidth - box.clientWidth, last: runs.querySelector("th:last-child").getBoundingClientRect().right});
</script>"""


@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize("width", [1280, 1800])
def test_the_runs_table_fits_the_page(write_records, tmp_path, width):
    results = wide_runs(write_records)
    collect(results, plots=False)
    measured = tmp_path / "measured.html"  # the page with a script that writes its layout into the DOM
    measured.write_text(Layout(results).report.read_text().replace("</body>", _MEASURE + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", f"--window-size={width},1000", measured.resolve().as_uri())
    fit = json.loads(unescape(re.search(r'data-fit="([^"]*)"', dom).group(1)))
    assert fit["window"] == width
    assert fit["page"] <= width, fit  # no part of the page is off to the right
    assert fit["hidden"] == 0 and fit["table"] <= fit["box"] + 0.5, fit  # every column shows, none scrolled away
    assert fit["last"] <= fit["box"] + 0.5, fit


def test_curve_svg_and_log_tail(tmp_path):
    assert curve_svg(None) == "–" and curve_svg([]) == "–"
    one = curve_svg([0.5])
    assert "<polyline" in one and "1 epoch: last 0.5000" in one
    long = curve_svg(list(np.linspace(0.1, 0.9, 1000)), width=100)
    assert long.count(",") <= 2 + 100 // 2 + 1  # a point every two pixels at most, the last epoch, two in its title
    assert log_tail(tmp_path / "missing.log") is None
    log = tmp_path / "job.err"
    log.write_bytes(b"x" * 100_000 + b"\nlast \xff line\n")
    assert log_tail(log, lines=1) == "last \ufffd line"


@pytest.mark.extended
@needs_chromium
def test_a_report_of_10000_runs_stays_small_and_opens(write_records, tmp_path):
    """10,000 runs of 144 configurations (8 models, 2 datasets, 3 recipes, 3 batch sizes), 2% failed: report.html
    keeps one row per configuration, stays under 20 MB with its plots, and Chromium lays it out and draws it."""
    configs = [
        {"model": m, "dataset": d, "recipe": r, "batch_size": b}
        for m in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34", "resnet50")
        for d in ("cifar10", "cifar100")
        for r in ("step-160", "step-200", "cos-200")
        for b in (64, 128, 256)
    ]
    failed = {"status": "failed", "final_test_acc": None, "test_acc": [0.1, 0.2], "epochs_done": 2, "error": "boom"}
    results = write_records(
        [
            {**configs[i % len(configs)], "seed": i // len(configs), **(failed if i % 50 == 7 else {})}
            for i in range(10_000)
        ]
    )
    collect(results)
    page = Layout(results).report
    assert page.stat().st_size < 20e6
    text = page.read_text()
    assert "<h2>Runs (10000 runs of 144 configurations)</h2>" in text and text.count("<details><summary>") >= 144
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1400,2400", page.resolve().as_uri())
    assert image.imread(shot).shape[:2] == (2400, 1400)
