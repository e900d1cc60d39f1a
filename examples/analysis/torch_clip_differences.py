"""Measure where dropgrad_dist.compat.torch_clip differs from torch-clip 0.0.6 (docs/_migrating_torch_clip.md).

torch-clip is not a dependency: unpack its sdist (``pip download --no-deps torch-clip``) and run
``TORCH_CLIP_SRC=/path/to/torch_clip-0.0.6 PYTHONPATH=. python examples/analysis/torch_clip_differences.py``
from the repository root. About 30 s on one CPU core.
"""
import contextlib
import io
import math
import os
import statistics
import sys

sys.path.insert(0, os.environ.get("TORCH_CLIP_SRC", "torch_clip-0.0.6"))
import torch
import torch_clip.optimizers as tco
from torch import nn
from torch_clip.optimizers_collector import OptimizerProperties as TCProps
from torch_clip.restarter import Restarter as TCRestarter
from torch_clip.utils import GradHistory

from dropgrad_dist.compat.torch_clip import ClippedSGD, OptimizerProperties, Restarter
from tests.nets import seeded_net

STEPS = 200

def data(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g)
    noise = torch.distributions.StudentT(1.5).sample((16, 3))  # heavy tails (global RNG: seeded below)
    return x, torch.sin(x[:, :3]) + noise

def batches():
    torch.manual_seed(123)
    return [data(s) for s in range(STEPS)]

BATCHES = batches()

def run(make, steps=STEPS, groups=False, restarter=None):
    model = seeded_net()
    params = ([{"params": list(model.encoder.parameters())}, {"params": list(model.decoder.parameters())}]
              if groups else model.parameters())
    opt = make(params)
    torch.manual_seed(7)
    norms = []
    with contextlib.redirect_stdout(io.StringIO()):
        for s in range(steps):
            x, y = BATCHES[s]
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            norms.append(math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters())))
            opt.step()
            if restarter is not None:
                restarter.add_coords(model.parameters())
                opt = restarter.make_restart(model, opt)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), norms

def rel(a, b):
    return float((a - b).norm() / b.norm())

def moved(a):
    start = torch.cat([p.detach().flatten() for p in seeded_net().parameters()])
    return float((a - start).norm())

print("## deterministic methods, float clipping_level (ours vs torch-clip): "
      "relative parameter difference after 200 steps")
for m, level in [("norm", 1.0), ("layer_wise", 0.5), ("coordinate_wise", 0.1)]:
    for mom in (0.0, 0.9):
        a, _ = run(lambda p: ClippedSGD(p, 0.05, mom, m, level))
        b, _ = run(lambda p: tco.ClippedSGD(p, 0.05, mom, m, level))
        print(f"{m:16s} momentum {mom}: |ours - tc| / |tc| = {rel(a, b):.2e}  (distance travelled {moved(b):.3f})")

print("## README: clipping_level=1 (an int): torch-clip replaces it by its per-method default")
a, _ = run(lambda p: ClippedSGD(p, 5e-2, 0.9, "layer_wise", 1))
b, _ = run(lambda p: tco.ClippedSGD(p, 5e-2, momentum=0.9, clipping_type="layer_wise", clipping_level=1))
c, _ = run(lambda p: tco.ClippedSGD(p, 5e-2, momentum=0.9, clipping_type="layer_wise", clipping_level=0.3))
print(f"int level: ours(1) vs tc(1): {rel(a, b):.2e}; tc(1) vs tc(0.3): {rel(c, b):.2e}")

print("## per-group norm (torch-clip) vs global norm (our default), norm clipping level 0.5, two groups")
a, _ = run(lambda p: ClippedSGD(p, 0.05, 0.0, "norm", 0.5), groups=True)
g, _ = run(lambda p: ClippedSGD(p, 0.05, 0.0, "norm", 0.5, norm_scope="group"), groups=True)
b, _ = run(lambda p: tco.ClippedSGD(p, 0.05, 0.0, "norm", 0.5), groups=True)
print(f"ours group vs tc: {rel(g, b):.2e}; ours global vs tc: {rel(a, b):.2e} (distance travelled {moved(b):.3f})")

print("## AutoClip level: torch-clip's heap percentile vs the exact quantile, p = 0.75 (and 0.5, 0.9)")
LOGNORMAL_NORMS = torch.randn(2000, generator=torch.Generator().manual_seed(0)).exp().tolist()
for p_auto in (0.5, 0.75, 0.9):
    for name, stream in [("lognormal(0,1) norms", LOGNORMAL_NORMS),
                         ("training norms", run(lambda p: ClippedSGD(p, 0.05, 0.0, "no_clip"))[1]),
                         ("decaying norms 10/sqrt(t)", [10 / math.sqrt(t + 1) for t in range(2000)])]:
        h = GradHistory("auto_clip", p_auto)
        diffs = []
        for i, v in enumerate(stream):
            h.add_grad_len(v)
            exact = torch.quantile(torch.tensor(stream[:i + 1], dtype=torch.float64), p_auto).item()
            diffs.append(h.get_grad_len() / exact - 1)
        late = diffs[len(diffs) // 2:]
        print(f"p={p_auto} {name:28s}: level tc/exact - 1: median {statistics.median(diffs):+.3f}, "
              f"range [{min(diffs):+.3f}, {max(diffs):+.3f}]; second half median {statistics.median(late):+.3f}")
a, _ = run(lambda p: ClippedSGD(p, 0.05, 0.0, "auto_clip", p_autoclip=0.75))
b, _ = run(lambda p: tco.ClippedSGD(p, 0.05, 0.0, "auto_clip", p_autoclip=0.75))
print(f"auto_clip p=0.75 params after 200 steps: |ours - tc| / |tc| = {rel(a, b):.2e} "
      f"(distance travelled {moved(b):.3f})")

print("## restart point: torch-clip divides the sum of n iterates by the number of tensors (4 here)")
a, _ = run(lambda p: ClippedSGD(p, 0.05, 0.0, "layer_wise", 0.5), steps=51,
           restarter=Restarter(OptimizerProperties(ClippedSGD, lr=0.05, momentum=0.0, clipping_type="layer_wise",
                                                   clipping_level=0.5), 50, 1.25, 2000))
b, _ = run(lambda p: tco.ClippedSGD(p, 0.05, 0.0, "layer_wise", 0.5), steps=51,
           restarter=TCRestarter(TCProps(tco.ClippedSGD, lr=0.05, momentum=0.0, clipping_type="layer_wise",
                                         clipping_level=0.5), 50, 1.25, 2000))
print(f"after the first restart (51 iterates): |tc| / |ours| = {float(b.norm() / a.norm()):.3f} (51/4 = {51/4})")

print("## random methods: torch-clip draws torch.rand per parameter tensor from the global RNG")
for m in ("linear_rand_norm", "quadratic_rand_norm"):
    ours, theirs_mixed, theirs_steps = [], 0, 0
    model = seeded_net()
    for s in range(STEPS):
        x, y = BATCHES[s]
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        norm = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
        a = 0.5 / norm
        if a >= 1:
            continue
        theirs_steps += 1
        prob = 0.5 ** (a if m.startswith("linear") else a * a)
        decisions = [bool(torch.rand(1) < prob) for _ in model.parameters()]
        theirs_mixed += len(set(decisions)) > 1
    print(f"{m}: steps where torch-clip clips some tensors and not others: {theirs_mixed}/{theirs_steps}; "
          f"global RNG draws per step: {len(list(model.parameters()))}")
