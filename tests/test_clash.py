"""Hugging Face's `kernels` distribution installs a top-level `kernels` package too: importing ours beside it
fails with an error that names the clash and the way out. The other distribution is faked by its metadata."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import _clash

ROOT = Path(__file__).resolve().parents[1]


def fake_hf_kernels(folder: Path) -> Path:
    """A site folder holding only the metadata of Hugging Face's `kernels` 0.9.0."""
    info = folder / "kernels-0.9.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.9.0\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\n")
    return folder


def test_no_clash_here():
    _clash.check()  # this environment has no `kernels` distribution


def test_clash_names_the_conflict_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_hf_kernels(tmp_path)))
    with pytest.raises(ImportError) as err:
        _clash.check()
    msg = str(err.value)
    assert "Hugging Face's `kernels`" in msg and "kernels 0.9.0" in msg and str(tmp_path) in msg
    assert "separate environments" in msg and "pip uninstall kernels" in msg


def test_import_kernels_fails_beside_it(tmp_path):
    site = fake_hf_kernels(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(site)]))
    code = "import sys\ntry:\n    import kernels\nexcept ImportError as e:\n    print(e, 'torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.startswith("sae-kernels cannot run beside Hugging Face's `kernels` distribution")
    assert run.stdout.strip().endswith("False")  # the check runs before torch is imported
