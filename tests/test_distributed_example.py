"""examples/train_fsdp.py under torchrun with 2 CPU processes (gloo), a few steps: FSDP2 +
FusedAdamW + GradualPruner train, a DCP checkpoint is saved and loaded into a new model and
optimizer that carry on, and the pruned model is compressed to SparseLinear with the same
held-out perplexity."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_fsdp_example_with_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "examples", "train_fsdp.py"), "--steps", "6", "--save-every", "3", "--prune-start", "1",
           "--prune-end", "4", "--prune-every", "1", "--batch", "4", "--corpus", "200000",
           "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "loaded " in out and "into a new model and optimizer (step 3)" in out, out[-4000:]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_000003", "step_000006"]
    m = re.search(r"pruned layers ([\d.]+)% zeros; held-out perplexity ([\d.]+) \(dense, masked\) -> ([\d.]+) "
                  r"\(SparseLinear\); weights ([\d.]+) MB -> ([\d.]+) MB", out)
    assert m, out[-4000:]
    zeros, ppl, ppl_sparse, dense_mb, stored_mb = map(float, m.groups())
    assert zeros == 75.0 and abs(ppl_sparse - ppl) <= 1e-3 * ppl and stored_mb < 0.6 * dense_mb, m.group(0)
    assert os.path.getsize(tmp_path / "out" / "model_sparse.pt") > 0
