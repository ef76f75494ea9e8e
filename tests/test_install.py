"""The install matrix: what `pip install fmfast` gives, with no extras, on this platform and others.

- A clean venv with `pip install .` (no dev or optional extras, no Triton) runs ingest -> train ->
  detect on a tiny generated recording, through decord; then, with decord uninstalled, through the PyAV
  fallback, which must store the same frames.
- The runtime requirements resolve to wheels only (`--only-binary :all:`) for Linux aarch64
  (manylinux_2_28, the glibc floor of torch's own aarch64 wheels: Jetson, ARM servers) and
  macOS arm64 (11, through PyAV, and 14, with decord2). uv resolves them: it evaluates the
  dependencies' environment markers for the target platform, where `pip download --platform`
  evaluates them for this machine and so asks for torch's x86_64-only CUDA wheels on aarch64.
  Skipped only when the package registry cannot be reached.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
START = "2024-03-01 08:00:00"
TINY = ["--num-frames", "4", "--current-seconds", "8"]
MODEL = ["model.depth=1", "model.dim=32", "model.heads=2", "model.dim_head=16", "model.mlp_dim=32"]


def registry_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def run(argv, timeout: float = 600, env=None) -> str:
    """Run a command to success -> its stdout + stderr (the assertion shows them otherwise)."""
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       env=env if env is not None else os.environ)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(map(str, argv))} -> exit {p.returncode}\n{out[-3000:]}"
    return out


def clean_env(cache: Path) -> dict:
    """The venv's commands without this test process's settings (PYTHONPATH would import the
    tree instead of the installed package), caching under ``cache``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    return {**env, "FMFAST_CACHE": str(cache)}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding torch (the README's CPU pin) and `pip install .` of a copy of the tree: the
    files a clean clone has, so nothing is built inside the repository."""
    if not registry_reachable():
        pytest.skip("needs the package registry (pypi.org) for fmfast's runtime requirements")
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if (REPO / f).is_file() and not (REPO / f).is_symlink():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    env = root / "venv"
    run([sys.executable, "-m", "venv", env])
    pip = [env / "bin" / "python", "-m", "pip", "install", "-q"]
    run(pip + ["torch==2.13.0"])  # the README's main-job install: no Triton, as on macOS and Windows
    run(pip + [src])
    return env / "bin"


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A 10 fps, 8 s video with a hot spot in its second half, its masks and a current log."""
    from helpers.recordings import frames, v2_current, write_video

    d = tmp_path_factory.mktemp("rec")
    f = frames(80, 48, 80)
    f[40:, 12:36, 20:60] = 255
    masks = np.zeros(f.shape[:3], np.uint8)
    masks[40:, 12:36, 20:60] = 1
    np.save(d / "masks.npy", masks)
    return write_video(d / "cam.mp4", f, fps=10), v2_current(d / "cur.csv", first=-10, seconds=20)[0], d / "masks.npy"


def ingest_train_detect(bin_: Path, recording, out: Path, detect_flags=()) -> str:
    """The user's path, each step a fresh process of the venv's `fmfast` -> what ingest printed."""
    video, cur, masks = recording
    fm, env = bin_ / "fmfast", clean_env(out / "cache")
    log = ""
    for name, split in (("a", "train"), ("b", "test")):
        log += run([fm, "ingest", video, cur, "--out", out / "data", "--start", START, "--labels", masks, "--size", "32",
                    *TINY, "--split", split, "--name", name], env=env)
    run([fm, "train", "--data", out / "data", "--out", out / "run", "--epochs", "1", "--batch-size", "4",
         "--max-eval-samples", "16", *TINY, *MODEL, "data.val_fraction=0"], env=env)
    said = run([fm, "detect", "--checkpoint", out / "run" / "best.pt", video, cur, "--start", START,
                "--out", out / "alarms", *detect_flags], env=env)
    assert "windows" in said and (out / "alarms" / "windows.csv").is_file() and (out / "alarms" / "timeline.png").is_file()
    rows = (out / "alarms" / "windows.csv").read_text().splitlines()
    assert rows[0].startswith("window,") and len(rows) > 3, rows
    return log


def stored_frames(root: Path, name: str) -> np.ndarray:
    """uint8 [N, 3, W, H] as ingest stored them."""
    from fmfast.data.matfile import dataset, open_mat, read_all

    path = root / "data" / "videos" / f"{name}.mat"
    with open_mat(path) as f:
        return read_all(dataset(f, path, "data", 4))


@pytest.fixture(scope="module")
def with_decord(venv, recording, tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    return out, ingest_train_detect(venv, recording, out)


def test_a_clean_install_runs_ingest_train_detect(venv, with_decord):
    installed = run([venv / "python", "-m", "pip", "list", "--format", "freeze"]).lower()
    assert "pytest" not in installed and "onnxruntime" not in installed, "dev/optional extras leaked in"
    assert "triton" not in installed  # so the run above went through the models' Triton-free paths
    out, log = with_decord
    assert log.count("decoded with decord") == 2, log  # the ingest summary names the decoder
    assert stored_frames(out, "a").shape[0] == 80


KERNELS_PROBE = """
import torch
from fmfast.kernels import cpu_attention as ca
x = torch.randn(1, 2, 9, 32)
for ok, why in (ca.available(), ca.available_f32()):
    assert ok or "its build failed" not in why, why  # the installed C sources build (a missing header would not)
ok, why = ca.available_f32()
if ok:
    assert torch.allclose(ca.cpu_attention(x, x, x, 0.2), ca.cpu_attention_ref(x, x, x, 0.2), atol=1e-5)
op_ok, op_why = ca._library_op()
assert op_ok or "its build failed" not in op_why, op_why  # and the C++ operators' source
if op_ok and ok:
    with torch.no_grad():
        assert torch.allclose(ca.cpu_attention(x, x, x, 0.2), ca.cpu_attention_ref(x, x, x, 0.2), atol=1e-5)
from fmfast.kernels import cpu_mlp
mlp_ok, mlp_why = cpu_mlp.available()
assert mlp_ok or "its build failed" not in mlp_why, mlp_why  # and the feed-forward kernel's
if mlp_ok:
    w = [torch.randn(64, 32), torch.randn(64), torch.randn(32, 64), torch.randn(32)]
    y = torch.randn(20, 32).bfloat16()
    assert torch.allclose(cpu_mlp.cpu_mlp(y, *w).float(), cpu_mlp.cpu_mlp_ref(y, *w).float(), atol=0.1, rtol=0.05)
from fmfast.kernels import cpu_patch_norm
pn_ok, pn_why = cpu_patch_norm.available()
assert pn_ok or "its build failed" not in pn_why, pn_why  # and the tokenizer's patch norm
if pn_ok:
    v, w1 = torch.randint(0, 256, (1, 3, 2, 16, 16), dtype=torch.uint8), torch.ones(384)
    assert torch.allclose(cpu_patch_norm.patch_norm(v, 1, 8, 2, w1, w1).float(),
                          cpu_patch_norm.patch_norm_ref(v, 1, 8, 2, w1, w1).float(), atol=0.05, rtol=0.01)
print(ca.__file__)
print("f32", ok, why)
"""


def test_the_installed_package_builds_its_cpu_kernels(venv, tmp_path):
    """The C and C++ sources and their shared header ship in the wheel: the CPU kernels (attention,
    feed-forward, patch norm) and the inference operators build from the installed package (the tiny models above, head dim 16, never call them)."""
    env = {**clean_env(tmp_path / "cache"), "FMFAST_KERNEL_CACHE": str(tmp_path / "k")}
    said = run([venv / "python", "-I", "-c", KERNELS_PROBE], env=env).strip().splitlines()  # -I: not the tree
    assert said[-1].startswith("f32 ") and said[-2].startswith(str(venv.parent)), said


def test_without_decord_the_pyav_fallback_does_the_same(venv, recording, with_decord, tmp_path):
    run([venv / "python", "-m", "pip", "uninstall", "-y", "decord2", "decord"])
    probe = subprocess.run([venv / "python", "-c", "import decord"], capture_output=True, text=True)
    assert probe.returncode != 0, "decord is still importable"
    log = ingest_train_detect(venv, recording, tmp_path, detect_flags=["--compile", "off"])
    assert log.count("decoded with PyAV") == 2, log
    a, b = stored_frames(with_decord[0], "a").astype(int), stored_frames(tmp_path, "a").astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2, "PyAV and decord stored different frames"


# Marker environments of the targets: pip and uv know the platform tags, not the kernel release
# (Darwin 20 = macOS 11, 23 = macOS 14) that fmfast's decord2 marker reads, so markers are
# evaluated here and the resolver gets plain requirements.
TARGETS = {
    "linux-aarch64": ("aarch64-manylinux_2_28", None, dict(platform_system="Linux", sys_platform="linux",
                                                            platform_machine="aarch64", platform_release="6.1.0")),
    "macos11-arm64": ("aarch64-apple-darwin", "11.0", dict(platform_system="Darwin", sys_platform="darwin",
                                                           platform_machine="arm64", platform_release="20.6.0")),
    "macos14-arm64": ("aarch64-apple-darwin", "14.0", dict(platform_system="Darwin", sys_platform="darwin",
                                                           platform_machine="arm64", platform_release="23.4.0")),
}


def runtime_requirements(target: dict) -> list[str]:
    """fmfast's install_requires (no extras) as they apply on ``target``, markers dropped."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), **target}
    out = []
    for r in map(Requirement, importlib.metadata.requires("fmfast") or []):
        if r.marker is None or ("extra" not in str(r.marker) and r.marker.evaluate(env)):
            out.append(f"{r.name}{r.specifier}")
    return out


@pytest.mark.parametrize("target", list(TARGETS))
def test_runtime_requirements_have_wheels_for(target, tmp_path):
    platform, macos, env_markers = TARGETS[target]
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(uv).exists():
        pytest.fail("uv (the dev extra) resolves requirements for other platforms; it is not installed")
    if not registry_reachable():
        pytest.skip("needs the package registry (pypi.org)")
    reqs = runtime_requirements(env_markers)
    assert ("decord2" in " ".join(reqs)) == (target != "macos11-arm64"), reqs  # PyAV alone where no decord2 wheel
    req = tmp_path / "requirements.txt"
    req.write_text("\n".join(reqs) + "\n")
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": macos} if macos else None
    resolved = run([uv, "pip", "compile", req, "--python-platform", platform, "--python-version",
                    f"{sys.version_info.major}.{sys.version_info.minor}", "--only-binary", ":all:", "--no-header",
                    "--index-url", "https://pypi.org/simple", "-q"], timeout=300, env=env)
    names = {line.split("==")[0].lower() for line in resolved.splitlines() if "==" in line}
    assert {"torch", "av", "numpy", "h5py"} <= names, resolved
