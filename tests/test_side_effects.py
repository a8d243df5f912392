"""Library calls leave the caller's process as they found it.

Each check runs in a fresh Python process (nothing loaded or cached beforehand), takes a
snapshot of the process-wide state a library could change — environment, umask, the global
RNGs, torch's thread count and default dtype, transformers' verbosity and progress bars,
logging levels, warning filters — then makes the call and compares.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Third-party libraries are imported before the first snapshot: what they do at import time
# is theirs; the checks are about what mlilt does.
SNAPSHOT = textwrap.dedent('''
    import json, logging, os, random, sys, warnings
    import numpy, timm, torch, torchvision, transformers
    # imported lazily on the way; at import they add warning filters (scipy, urllib3,
    # transformers.optimization) or draw from Python's RNG (rich.progress)
    import rich.progress, scipy.optimize, scipy.sparse, scipy.special, urllib3, transformers.optimization
    import accelerate, sacrebleu, datasets
    from transformers.utils import logging as hf_logging

    def _umask():
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return line.split()[1]

    def snapshot():
        loggers = {name: (log.level, log.disabled, len(log.handlers), log.propagate)
                   for name, log in logging.root.manager.loggerDict.items() if isinstance(log, logging.Logger)}
        return {
            "environ": dict(os.environ),
            "umask": _umask(),
            "torch_rng": torch.get_rng_state().tolist(),
            "python_rng": repr(random.getstate()),
            "numpy_rng": repr(numpy.random.get_state()),
            "threads": torch.get_num_threads(),
            "default_dtype": str(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "hf_verbosity": hf_logging.get_verbosity(),
            "hf_progress_bars": hf_logging.is_progress_bar_enabled(),
            "root_logging": (logging.root.level, len(logging.root.handlers)),
            "loggers": loggers,
            "warning_filters": repr(warnings.filters),
        }

    def changed(before, after):
        out = {}
        for key, value in before.items():
            if key == "loggers":  # loggers created during the call are new, not changed
                value = {k: v for k, v in value.items() if after[key].get(k) != v}
                if value:
                    out[key] = {k: [v, after[key].get(k)] for k, v in value.items()}
            elif after[key] != value:
                out[key] = [value, after[key]] if key != "environ" else sorted(
                    k for k in set(value) | set(after[key]) if value.get(k) != after[key].get(k))
        return out
''')


def _run(body: str, cwd: Path) -> dict:
    """Run ``body`` between two snapshots in a fresh process; what changed, by name."""
    script = SNAPSHOT + "\nbefore = snapshot()\n" + textwrap.dedent(body) + \
        "\nprint('CHANGED=' + json.dumps(changed(before, snapshot()), default=str))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("CHANGED="))
    return json.loads(line.removeprefix("CHANGED="))


def _save_tiny_towers(folder: Path) -> tuple[str, str]:
    """Tiny random towers saved as Hugging Face folders, so a fresh process loads them through
    the same code as any hub model."""
    from transformers import ViTImageProcessor

    from tiny_towers import save_tiny_text_tower, tiny_hf_vit

    save_tiny_text_tower(folder / "text")
    tiny_hf_vit().model.save_pretrained(folder / "image")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      do_center_crop=False).save_pretrained(folder / "image")
    return str(folder / "text"), "hf:" + str(folder / "image")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pack trained in a fresh process on tiny towers; what training changed in that process."""
    from mlilt.demo.data import generate_demo

    root = tmp_path_factory.mktemp("side-effects")
    text, image = _save_tiny_towers(root / "towers")
    demo = generate_demo(root / "demo", ["sw"], n=24, image_size=32)
    changed = _run(f'''
        from mlilt.training.config import TrainConfig
        from mlilt.training.trainer import train
        train(TrainConfig(lang="sw", data={str(demo.files("sw")["train"])!r}, out={str(root / "pack")!r},
                          text_tower={text!r}, image_tower={image!r}, embed_dim=16, epochs=1, batch_size=4,
                          max_length=16))
    ''', root)
    return root / "pack", changed


def test_import_changes_nothing(tmp_path):
    assert _run("import mlilt", tmp_path) == {}


def test_load_and_encode_change_nothing(trained, tmp_path):
    pack, _ = trained
    changed = _run(f'''
        import mlilt
        from PIL import Image
        model = mlilt.load({str(pack)!r})
        model.encode_text(["mbwa anakimbia"], lang="sw")
        model.encode_image([Image.new("RGB", (40, 30), "red")])
    ''', tmp_path)
    assert changed == {}


def test_training_changes_nothing(trained):
    _, changed = trained
    assert changed == {}


def test_text_only_use_never_loads_the_image_tower(trained, tmp_path):
    """With the image tower's folder gone, text still encodes; the image side fails on first use."""
    pack, _ = trained
    image_folder = pack.parent / "towers" / "image"
    image_folder.rename(tmp_path / "image-away")
    try:
        changed = _run(f'''
            import mlilt
            from mlilt.errors import TowerLoadError
            model = mlilt.load({str(pack)!r})
            assert model.encode_text(["mbwa anakimbia"], lang="sw").shape[0] == 1
            try:
                model.encode_image([__import__("PIL.Image").Image.new("RGB", (32, 32))])
            except TowerLoadError:
                pass
            else:
                raise AssertionError("the image side loaded without its tower")
        ''', tmp_path)
    finally:
        (tmp_path / "image-away").rename(image_folder)
    assert changed == {}
