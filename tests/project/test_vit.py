"""The ViT example: synthetic data, CIFAR-10 path, single-process training, resume, plots, bad input."""

import csv
import hashlib
import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

VIT = Path(__file__).resolve().parents[2] / "examples" / "vit"
sys.path.insert(0, str(VIT))

import data  # noqa: E402
import plot  # noqa: E402
import train  # noqa: E402

TINY = ["--num_layers", "1", "--hidden_dim", "32", "--mlp_dim", "64", "--num_heads", "2", "--patch_size", "8",
        "--batch_size", "32", "--train_size", "256", "--test_size", "64", "--warmup_steps", "2"]


def _run_train(args, check=True):
    done = subprocess.run([sys.executable, str(VIT / "train.py"), *args], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _records(output_dir: Path, kind: str):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_synthetic_data_is_deterministic_and_seed_dependent():
    a, b, c = data.make_synthetic(64, seed=3), data.make_synthetic(64, seed=3), data.make_synthetic(64, seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    images, labels = a.tensors
    assert images.shape == (64, 3, 32, 32) and labels.min() >= 0 and labels.max() <= 9


def test_synthetic_data_is_learnable_by_a_tiny_model():
    train_set, test_set = data.synthetic_splits(seed=0, train_size=2000, test_size=500)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
                                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, labels = train_set.tensors
    for _ in range(3):
        for i in range(0, 2000, 50):
            loss = torch.nn.functional.cross_entropy(model(images[i:i + 50]), labels[i:i + 50])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(test_set.tensors[0]).argmax(1) == test_set.tensors[1]).float().mean().item()
    assert accuracy > 0.25  # chance is 0.1 (sigma 0.013 on 500 images)


def _write_fake_cifar(root: Path, per_batch: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": list(data.CLASSES)}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_path_reads_the_on_disk_format(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    _write_fake_cifar(tmp_path, per_batch=20)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (tmp_path / "cifar-10-batches-py").iterdir()}
    # torchvision checks the files against the real CIFAR-10 checksums; point it at the fake files'.
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5[n]] for n, _ in CIFAR10.test_list])
    monkeypatch.setitem(CIFAR10.meta, "md5", md5["batches.meta"])
    args = train.parse_args(["--dataset", "cifar10", "--data_dir", str(tmp_path)])
    train_set, test_set = train.load_data(args)
    assert len(train_set) == 100 and len(test_set) == 20
    image, label = train_set[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_single_process_training_logs_metrics_and_learns(tmp_path):
    out = tmp_path / "run"
    _run_train([*TINY, "--max_steps", "16", "--eval_every", "8", "--drop_rate", "0.2", "--output_dir", str(out),
                "--optimizer", "lion", "--lr", "1e-3"])
    steps = _records(out, "train")
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all(r["drop_rate"] == 0.2 and abs(r["kept_fraction"] - 0.8) < 1e-9 for r in steps)
    evals = _records(out, "eval")
    assert [e["step"] for e in evals] == [8, 16]
    assert _records(out, "final")[0]["test_accuracy"] == evals[-1]["test_accuracy"]
    assert (out / "model.pt").is_file()


def test_bf16_on_cpu_trains(tmp_path):
    out = tmp_path / "bf16"
    _run_train([*TINY, "--max_steps", "4", "--mixed_precision", "bf16", "--output_dir", str(out)])
    assert _records(out, "final")[0]["mixed_precision"] == "bf16"
    assert all(np.isfinite(r["loss"]) for r in _records(out, "train"))


def test_bf16_autocast_on_a_cpu_without_bf16_instructions_warns_once(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "_WARNED_SLOW_BF16", False)
    with pytest.warns(UserWarning, match="several times slower than fp32: drop --mixed_precision bf16"):
        assert train.warn_if_slow_bf16("bf16", cpu, native=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not train.warn_if_slow_bf16("bf16", cpu, native=False)  # once per process
        monkeypatch.setattr(train, "_WARNED_SLOW_BF16", False)
        assert not train.warn_if_slow_bf16("bf16", cpu, native=True)
        assert not train.warn_if_slow_bf16("no", cpu, native=False)
        assert not train.warn_if_slow_bf16("bf16", torch.device("cuda"), native=False)
    # What the run asks the CPU: x86 without AVX512-BF16 or AMX is not native.
    monkeypatch.setattr(train.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not train.cpu_has_bf16_instructions()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert train.cpu_has_bf16_instructions()


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    common = [*TINY, "--max_steps", "12", "--drop_rate", "0.3", "--dropout", "0.1", "--epochs", "3",
              "--gradient_accumulation_steps", "2", "--checkpointing_steps", "5"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run_train([*common, "--output_dir", str(full)])
    _run_train([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(full / "step_5")])
    want = torch.load(full / "model.pt", weights_only=True)
    got = torch.load(resumed / "model.pt", weights_only=True)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert [r["loss"] for r in _records(full, "train")][5:] == [r["loss"] for r in _records(resumed, "train")]


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--drop_rate", "1.5"], "--drop_rate must be in [0, 1]"),
    (["--dataset", "cifar10", "--data_dir", "{tmp}/no-cifar-here"], "CIFAR-10 is not in --data_dir"),
])
def test_bad_input_ends_with_a_one_line_error(argv, message, tmp_path):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    done = _run_train([*TINY, "--max_steps", "1", "--output_dir", str(tmp_path / "out"), *argv], check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


def _is_png(path: Path, min_width: int = 500) -> bool:
    from PIL import Image

    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    with Image.open(path) as image:
        return image.size[0] > min_width and image.size[1] > 250


def test_plot_groups_seeds_into_bands_and_writes_every_file(tmp_path):
    for optimizer in ("adamw", "sgd"):
        for scenario, slope in (("baseline", 0.1), ("dropgrad", 0.2), ("clip_norm", 0.15)):
            for seed in range(3):
                folder = tmp_path / f"{optimizer}-{scenario}-seed{seed}"
                folder.mkdir()
                evals = [{"type": "eval", "step": s, "train_loss": 2 - slope * s, "test_loss": 2.1 - slope * s,
                          "train_accuracy": 0.1 + slope * s / 2, "test_accuracy": 0.1 + slope * s / 3 + seed / 100}
                         for s in (1, 2, 3)]
                train_records = [{"type": "train", "step": s, "grad_norm": 10.0 ** (s + seed / 3),
                                  "grad_norm_clipped": min(10.0 ** (s + seed / 3), 30.0)} for s in range(1, 30)]
                records = train_records + evals + [{"type": "final", "wall_time": 12.5 + seed}]
                (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    (tmp_path / "sgd-dropgrad-seed9").mkdir()  # an unfinished run: no final record, left out
    (tmp_path / "sgd-dropgrad-seed9" / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1}) + "\n")
    assert plot.main([str(tmp_path)]) == 0
    assert _is_png(tmp_path / "curves.png") and _is_png(tmp_path / "grad_norms.png")
    summary = (tmp_path / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| optimizer | scenario | seeds | final test acc | best test acc |")
    assert "| adamw | dropgrad | 3 | 0.310 ± 0.010 | 0.310 ± 0.010 |" in "\n".join(summary)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 6 and {r["seeds"] for r in rows} == {"3"}
    assert [r["final_accuracy_vs_baseline"] for r in rows if r["scenario"] == "baseline"] == ["", ""]
    assert {round(float(r["final_accuracy_vs_baseline"]), 3) for r in rows if r["scenario"] == "dropgrad"} == {0.1}


def test_sweep_curves_show_a_run_with_one_evaluation(tmp_path):
    """A short sweep evaluates once per run: each test-loss and accuracy curve is one point, drawn with a marker."""
    for scenario in ("baseline", "dropgrad"):
        records = [{"type": "train", "step": s, "loss": 2.0 / s} for s in range(1, 5)]
        records += [{"type": "eval", "step": 4, "test_loss": 1.5, "test_accuracy": 0.3},
                    {"type": "final", "wall_time": 3.0}]
        folder = tmp_path / f"sgd-{scenario}-seed0"
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    groups = plot.group_runs([plot.read_run(run) for run in plot.find_runs([str(tmp_path)])])
    _, test_loss_ax, accuracy_ax = plot.curves_figure(groups).axes
    for ax in (test_loss_ax, accuracy_ax):
        lines = ax.get_lines()
        assert len(lines) == 2 and all(len(line.get_xdata()) == 1 for line in lines)
        assert all(line.get_marker() not in (None, "None", "", " ") for line in lines), ax.get_ylabel()


def test_plot_of_one_run_shows_train_loss_per_step_labelled_axes_and_no_blank_columns(tmp_path):
    run = tmp_path / "demo"
    run.mkdir()
    config = {"type": "config", "processes": 2, "dataset": "synthetic", "optimizer": "adamw", "drop_rate": 0.1,
              "dropout": 0.0, "clipping_type": None, "sam_rho": 0.0, "gnp_alpha": 0.0}
    train_records = [{"type": "train", "step": s, "loss": 2.0 / s, "grad_norm": 1.0} for s in range(1, 101)]
    evals = [{"type": "eval", "step": s, "train_loss": 2.0 / s, "train_accuracy": 0.5 + s / 400,
              "test_loss": 2.5 / s, "test_accuracy": 0.4 + s / 500} for s in (50, 100)]
    records = [config, *train_records, *evals, {"type": "final", "step": 100, "wall_time": 42.0}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")

    figure = plot.run_figure(plot.read_run(run))
    title = figure._suptitle.get_text()
    assert "seeds" not in title and "±" not in title
    assert "demo: ViT on synthetic, adamw, DropGrad p=0.1, 2 processes" in title
    assert "test accuracy 0.600 after 100 steps in 42 s" in title
    loss_ax, accuracy_ax = figure.axes
    assert loss_ax.get_ylabel() and accuracy_ax.get_ylabel()
    per_step = [line for line in loss_ax.get_lines() if line.get_label() == "train loss per step"]
    assert len(per_step) == 1 and list(per_step[0].get_ydata()) == [2.0 / s for s in range(1, 101)]
    assert {line.get_label() for line in accuracy_ax.get_lines()} >= {"test accuracy"}

    assert plot.main([str(run)]) == 0
    assert _is_png(run / "curves.png")
    table = [line.strip("|").split("|") for line in (run / "summary.md").read_text().splitlines()]
    assert [cell.strip() for cell in table[0]] == ["run", "seeds", "final test acc", "best test acc",
                                                   "final test loss", "wall s"]
    assert [cell.strip() for cell in table[2]] == ["demo", "1", "0.600", "0.600", "0.025", "42.0"]


def test_moving_average_is_the_mean_of_the_last_window_values():
    assert plot.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plot.moving_average([4.0, 2.0], 1) == [4.0, 2.0]


def test_sweep_runs_the_grid_resumes_and_reports_a_failed_run(tmp_path):
    """Two cells finish; a third (SAM with accumulation, refused by train.py) fails without stopping them."""
    out = tmp_path / "sweep"
    argv = [sys.executable, str(VIT / "sweep.py"), "--scenarios", "baseline", "dropgrad", "sam", "--optimizers", "sgd",
            "--seeds", "0", "--output_dir", str(out), "--", *TINY, "--cpu", "--max_steps", "2",
            "--gradient_accumulation_steps", "2", "--batch_size", "64"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "FAILED sgd-sam-seed0: exit code 2" in done.stderr
    assert "2 runs done, 1 failed" in done.stdout
    for run in ("sgd-baseline-seed0", "sgd-dropgrad-seed0"):
        assert _records(out / run, "final")
    assert _is_png(out / "curves.png", min_width=300) and _is_png(out / "grad_norms.png", min_width=300)
    assert (out / "summary.md").is_file() and (out / "summary.csv").is_file()
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert "3 runs, 2 already finished, 1 to go" in again.stdout


def test_comm_hook_flag_gives_accelerate_the_hook_and_refuses_compact():
    from accelerate.utils import DDPCommunicationHookType

    assert train.ddp_kwargs(train.parse_args([])) == []
    (bf16,) = train.ddp_kwargs(train.parse_args(["--comm_hook", "bf16"]))
    assert bf16.comm_hook == DDPCommunicationHookType.BF16
    (psgd,) = train.ddp_kwargs(train.parse_args(["--comm_hook", "powersgd", "--powersgd_rank", "2", "--cpu"]))
    assert psgd.comm_hook == DDPCommunicationHookType.POWER_SGD
    assert psgd.comm_state_option == {"matrix_approximation_rank": 2, "start_powerSGD_iter": 10}
    assert psgd.bucket_cap_mb > 1000  # gloo: one bucket keeps PowerSGD's collectives in order across ranks
    with pytest.raises(SystemExit):
        train.parse_args(["--comm_hook", "bf16", "--drop_rate", "0.5", "--communication", "compact"])
    with pytest.raises(SystemExit):
        train.parse_args(["--comm_hook", "powersgd", "--powersgd_start", "1"])
