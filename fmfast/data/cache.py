"""The built-in synthetic benchmark, generated once into a cache folder and reused."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("FMFAST_CACHE", Path.home() / ".cache" / "fmfast"))


def default_synthetic_root(recordings: int = 3, frames: int = 3000, seed: int = 0, size: int = 64,
                           console=None) -> Path:
    """Path of the synthetic dataset with these parameters, generating it on first use.

    Generation writes into a temporary folder that is renamed into place, so an interrupted
    first run never leaves a half-written dataset that later runs would trust."""
    from fmfast.data.synthetic import VERSION, generate

    root = cache_dir() / f"synthetic-v{VERSION}-r{recordings}-f{frames}-s{seed}-{size}px"
    if (root / "test.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        if console is not None:
            console.print(f"generating the synthetic furnace benchmark into {root} (once) ...")
        generate(tmp, recordings=recordings, frames=frames, seed=seed, size=size)
        try:
            os.replace(tmp, root)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
