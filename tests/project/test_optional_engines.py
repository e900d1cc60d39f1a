"""Optional engines (DeepSpeed, Lightning, Transformers) are imported only by the code that uses them.

DeepSpeed prints a line from every process when it is imported on a machine without a GPU; the
package, ``prepare_regularizers`` on a plain model and the ViT example's training path must not
import it (or the trainer libraries) just because they are installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("deepspeed", "lightning", "transformers", "pytorch_lightning")

PROBE = f"""
import json, sys
engines = {ENGINES!r}
loaded = lambda: sorted(name for name in engines if name in sys.modules)
seen = {{}}
import dropgrad_dist
seen["import dropgrad_dist"] = loaded()

import torch
from accelerate import Accelerator
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(4, 2)
model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
regularizers = dropgrad_dist.prepare_regularizers(
    accelerator, model, optimizer, dropgrad=dict(drop_rate=0.5, seed=0),
    clipping=dict(method="norm", clipping_level=1.0), gnp=dict(alpha=0.5, r=0.05))
def closure():
    loss = model(torch.ones(3, 4)).square().mean()
    accelerator.backward(loss)
    return loss
regularizers.step(closure)
regularizers.metrics()
seen["prepare_regularizers and a step"] = loaded()

sys.path.insert(0, {str(ROOT / "examples" / "vit")!r})
import train
code = train.main(["--num_layers", "1", "--hidden_dim", "16", "--mlp_dim", "32", "--num_heads", "2",
                   "--batch_size", "16", "--train_size", "32", "--test_size", "16", "--max_steps", "2",
                   "--output_dir", sys.argv[1]])
seen["examples/vit/train.py"] = loaded() if code == 0 else f"exit code {{code}}"
print(json.dumps(seen))
"""


def test_no_optional_engine_is_imported_unless_used(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"import dropgrad_dist": [], "prepare_regularizers and a step": [], "examples/vit/train.py": []}
    assert (tmp_path / "run" / "model.pt").is_file()
