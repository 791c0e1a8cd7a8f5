"""README's Python examples run as written on a CPU-only machine (one namespace, in order, like a reader)."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_blocks_run_on_cpu(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # the examples write files
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["device"] == "cpu" and namespace["out"].shape == (512, 768)
    assert (tmp_path / "my_sae" / "cfg.json").is_file()
