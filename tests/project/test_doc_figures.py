"""Figures the front-door documents state, checked where code or a committed measurement decides them.

The demo's accuracy comes from its committed summary (docs/demo/summary.md, what `launch/demo.sh`
wrote; the run is deterministic), the demo's output files from what its code writes, the 2-D
analysis' run counts from what the script plans. Timings are measurements: they name their date.
"""

import ast
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VIT = ROOT / "examples" / "vit"


def _summary_row(path: Path) -> dict[str, str]:
    """The one run of a plot.py summary table: column -> cell."""
    lines = [line.strip().strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("|")]
    header, row = [c.strip() for c in lines[0]], [c.strip() for c in lines[2]]
    assert len(lines) == 3, f"{path}: one run expected"
    return dict(zip(header, row))


def test_readme_states_the_demo_accuracy_of_the_committed_demo_summary():
    accuracy = float(_summary_row(ROOT / "docs" / "demo" / "summary.md")["final test acc"])
    stated = re.findall(r"(\d+(?:\.\d+)?)% test\s+accuracy", (ROOT / "README.md").read_text())
    assert stated, "README.md names the demo's test accuracy"
    assert all(float(value) == round(100 * accuracy, 1) for value in stated), (stated, accuracy)


def _files_written(script: Path) -> set[str]:
    """File names the script writes into its output folder: ``output_dir / "name"`` or ``out_dir / "name"``."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.Name)
                and node.left.id in ("output_dir", "out_dir") and isinstance(node.right, ast.Constant)):
            names.add(node.right.value)
    return names


def test_the_demo_output_lists_are_what_train_and_plot_write():
    written = _files_written(VIT / "train.py") | _files_written(VIT / "plot.py")
    assert {"metrics.jsonl", "model.pt", "curves.png", "summary.md"} <= written  # the parse finds them
    readme = " ".join((ROOT / "README.md").read_text().split())
    sentence = re.search(r"The demo writes `outputs/demo/`: (.*?)\.(?: |$)", readme)
    assert sentence, "README.md lists what the demo writes"
    assert set(re.findall(r"`([\w.]+\.\w+)`", sentence.group(1))) == written
    header = " ".join(line.lstrip("# ") for line in (ROOT / "launch" / "demo.sh").read_text().splitlines()
                      if line.startswith("#"))
    listed = re.search(r"Writes \$OUTPUT_DIR \(default outputs/demo\): (.*?)\.(?: |$)", header)
    assert listed and set(re.findall(r"\b([\w]+\.(?:jsonl|png|md|csv|pt))\b", listed.group(1))) == written


def _analysis():
    spec = importlib.util.spec_from_file_location("analysis_benchmarks", ROOT / "examples" / "analysis" /
                                                  "benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_analysis_readme_states_the_run_counts_the_script_plans():
    benchmarks, text = _analysis(), (ROOT / "examples" / "analysis" / "README.md").read_text()
    quick = re.search(r"--quick\s+# smoke: (\d+) runs of (\d+) steps", text)
    full = re.search(r"# full: (\d+) runs, (\d+)k steps", text)
    assert quick and full
    for argv, (runs, steps) in ((["--quick"], quick.groups()), ([], full.groups())):
        specs = [spec for group in benchmarks.planned_specs(benchmarks.parse_args(["--output_dir", "x", *argv]))
                 for spec in group]
        total = sum(spec.steps for spec in specs)
        assert len(specs) == int(runs), argv
        assert (total == int(runs) * int(steps)) if argv else (round(total / 1000) == int(steps)), argv
