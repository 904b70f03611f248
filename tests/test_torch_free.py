"""edge_sdk imports, loads, trains, evaluates and predicts in a process where torch and onnx cannot load."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from exporter import export_bundle, zoo

ROOT = Path(__file__).resolve().parents[1]

DEVICE_SCRIPT = textwrap.dedent('''
    import sys

    class Blocker:
        """A meta-path finder that makes torch and onnx unimportable, as on a phone."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx"):
                raise ImportError(f"{name} is blocked on this device")
            return None

    sys.meta_path.insert(0, Blocker())

    import numpy as np
    import edge_sdk
    import edge_sdk.device_cli, exporter.cli  # CLI modules must not import torch either
    from edge_sdk._ort import training_api
    from edge_sdk.bundle import Bundle
    from edge_sdk.predictor import Predictor
    from edge_sdk.trainer import LocalTrainer

    training_api()
    bundle = Bundle.load(sys.argv[1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    trainer = LocalTrainer(bundle, threads=1)
    before = trainer.evaluate(x, y).loss
    result = trainer.train((x, y), epochs=3, batch_size=16, seed=0)
    after = trainer.evaluate(x, y).loss
    assert after < before, (before, after)
    trainer.export_inference(sys.argv[2])
    assert Predictor(sys.argv[2]).predict(x).shape == (64, 2)
    blocked = [m for m in sys.modules if m.split(".")[0] in ("torch", "onnx")]
    assert not blocked, blocked
    print(f"OK {before:.4f} {after:.4f} {result.steps}")
''')


def test_edge_sdk_trains_without_torch(tmp_path):
    torch.manual_seed(0)
    bundle = export_bundle(zoo.mlp(), "1x10", tmp_path / "mlp", loss="cross_entropy", lr=0.01)
    script = tmp_path / "device.py"
    script.write_text(DEVICE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), str(bundle.path), str(tmp_path / "inf.onnx")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    words = proc.stdout.split()
    assert words[0] == "OK" and float(words[2]) < float(words[1]) and words[3] == "12"
