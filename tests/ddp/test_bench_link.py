"""The shaped link of ``bench ddp --link``: parsing, the tc commands, and a quick run where the privilege exists."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dropgrad_dist.bench.link import Link, parse_link, private_namespace, shape_loopback

ROOT = Path(__file__).resolve().parents[2]


def test_parse_link_reads_rate_and_delay():
    assert parse_link("1gbit") == Link("1gbit", 1e9, 0.0)
    assert parse_link("10gbit,1ms") == Link("10gbit,1ms", 1e10, 1e-3)
    assert parse_link("500mbit,250us").rate_bit_s == 5e8
    assert parse_link("500mbit,250us").delay_s == pytest.approx(2.5e-4)
    assert parse_link("none").rate_bit_s is None
    for bad in ("fast", "1gbyte", "0gbit", "1gbit,1", "1gbit,-1ms", ""):
        with pytest.raises(ValueError, match="--link must be RATE"):
            parse_link(bad)


def test_tc_commands_shape_with_tbf_under_netem():
    rate_only = Link("1gbit", 1e9).tc_commands()
    assert len(rate_only) == 1 and rate_only[0][:6] == ["tc", "qdisc", "add", "dev", "lo", "root"]
    tbf = rate_only[0]
    assert tbf[tbf.index("rate") + 1] == "1000000000bit"
    assert int(tbf[tbf.index("burst") + 1]) >= 2 * 65536  # a bucket below a loopback packet would drop it
    delayed = Link("10gbit,1ms", 1e10, 1e-3).tc_commands()
    assert [c[c.index("lo") + 1:][:2] for c in delayed] == [["root", "handle"], ["parent", "1:1"]]
    assert "netem" in delayed[0] and delayed[0][delayed[0].index("delay") + 1] == "1000us"
    assert int(delayed[1][delayed[1].index("burst") + 1]) == int(1e10 / 8 * 1e-3)  # 1 ms at 10 Gbit/s
    assert Link("none", None).tc_commands() == []


def test_shaping_refuses_the_machines_own_namespace():
    if private_namespace():
        pytest.skip("this test process already runs in a private network namespace")
    applied, reason = shape_loopback(parse_link("1gbit"))
    assert applied is None and "refusing" in reason


@pytest.mark.distributed
def test_quick_bench_meets_the_set_rate_and_compact_sends_less():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "dropgrad_dist", "bench", "ddp", "--link", "1gbit", "--quick",
                           "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    if "no private namespace" in report["device"]:  # the reason is the run's first note
        pytest.skip(f"no shaped link here (needs CAP_NET_ADMIN): {report['notes'][0]}")
    check, *rows = report["rows"]
    assert check["link"] == "1gbit"
    assert 0.7 <= check["achieved_vs_set"] <= 1.3, check  # the shaping is real
    wire = {row["candidate"]: row["wire_MB_per_rank"] for row in rows}
    quick_mlp_mb = 1_313_024 * 4 / 1e6  # --quick: the width-512 MLP's gradient
    # 2 ranks: a ring all-reduce moves each bucket once per rank (plus TCP/IP headers)
    assert quick_mlp_mb <= wire["allreduce_hook"] < 1.1 * quick_mlp_mb
    assert wire["dropgrad compact p=0.9"] < 0.2 * wire["allreduce_hook"]
    assert wire["dropgrad compact p=0.5"] < 0.6 * wire["allreduce_hook"]
    assert wire["no-op (no communication)"] < 0.01 * wire["allreduce_hook"]
    assert wire["sync only (4 bytes per bucket)"] < 0.01 * wire["allreduce_hook"]
    assert wire["PowerSGD rank 1"] < 0.1 * wire["allreduce_hook"]


def test_candidates_option_keeps_the_references_and_names_what_is_allowed():
    from dropgrad_dist.bench.ddp import _candidates

    base = {"link": "1gbit", "index_path": False}
    floors = ["no-op (no communication)", "sync only (4 bytes per bucket)", "allreduce_hook"]
    assert list(_candidates({**base, "candidates": None}))[:4] == [*floors, "bf16_compress_hook"]
    chosen = _candidates({**base, "candidates": "dropgrad compact p=0.9, PowerSGD rank 4"})
    assert list(chosen) == [*floors, "PowerSGD rank 4", "dropgrad compact p=0.9"]  # the table's order, floors kept
    plain = _candidates({"link": None, "index_path": False, "candidates": "dropgrad compact p=0.9"})
    assert list(plain) == ["allreduce_hook", "dropgrad dense p=0.1", "dropgrad compact p=0.9"]
    with pytest.raises(ValueError, match=r"--candidates: unknown 'compact'; allowed: 'no-op"):
        _candidates({**base, "candidates": "compact"})
