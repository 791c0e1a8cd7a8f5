"""The name clash with Hugging Face's `kernels` distribution (PyPI "kernels", which transformers looks for).

It installs a top-level package named `kernels` too, so with both distributions in one environment the
second install overwrites the first one's files and `import kernels` gets a mix of the two. `import kernels`
(this package) runs `check()` first and raises an ImportError that names the conflict and the way out.
Standard library only: this runs before torch or triton is imported.
"""

from __future__ import annotations

from importlib import metadata

OTHER = "kernels"  # Hugging Face's distribution name; ours is "sae-kernels"


def check() -> None:
    """Raise ImportError when the distribution `kernels` is installed in this environment."""
    try:
        dist = metadata.distribution(OTHER)
    except metadata.PackageNotFoundError:
        return
    where = dist.locate_file("")
    raise ImportError(
        f"sae-kernels cannot run beside Hugging Face's `kernels` distribution (kernels {dist.version}, installed "
        f"in {where}): both install a top-level Python package named `kernels`, so one overwrites the other's "
        "files. Use separate environments: keep Hugging Face's kernels (and transformers' kernel hub) in one "
        "virtual environment and sae-kernels in another (python -m venv ...), or, if you do not need it here, "
        "`pip uninstall kernels` and then reinstall sae-kernels (`pip install --force-reinstall sae-kernels`)."
    )


check()
