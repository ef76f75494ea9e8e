from setuptools import setup

# kernels/ lives at the top level (one concept per file, no model knowledge) but is
# installed as fmfast.kernels, for both `pip install .` and `pip install -e .`.
setup(
    name="fmfast",
    version="0.1.0",
    description="Fast FmFormer: cross-modal (video + arc current) anomaly detection for fused magnesium furnaces",
    python_requires=">=3.10",
    packages=["fmfast", "fmfast.data", "fmfast.nn", "fmfast.models", "fmfast.engine", "fmfast.detect", "fmfast.cli",
              "fmfast.kernels"],
    package_dir={"fmfast.kernels": "kernels"},
    # the CPU attention kernel's C source, built at first use (kernels/cpu_attention.py)
    package_data={"fmfast.kernels": ["csrc/*.c", "csrc/*.cpp", "csrc/*.h"]},
    install_requires=[
        # (Triton is not required: CUDA builds of torch bring the one they match; without it the
        # models run their reference / fused paths, as on macOS and Windows, where it has no wheels)
        "torch>=2.6",
        "numpy",
        "einops",
        "h5py",
        # decord2, the maintained fork of decord 0.6.0 (installed as `import decord`; the same
        # frames, as fast), where it has wheels: it has no source release, so elsewhere (macOS
        # before 14 = Darwin 23, macOS x86_64, other CPUs, newer Pythons) none is required and
        # fmfast decodes with PyAV (av)
        "decord2>=3.4; python_version < '3.15' and ((platform_system == 'Linux' and (platform_machine == 'x86_64'"
        " or platform_machine == 'aarch64')) or (platform_system == 'Darwin' and platform_machine == 'arm64'"
        " and platform_release >= '23') or (platform_system == 'Windows' and platform_machine == 'AMD64'))",
        # av reads a video's container header in the probe (fmfast/data/probe.py): the frame
        # count it declares is how a truncated recording is told from a short one (decord
        # does not expose it) and how a lying header is refused before decord allocates for it
        "av",
        "rich",
        "pyyaml",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["fmfast = fmfast.cli:main"]},
    extras_require={
        # fmfast export --format onnx/openvino (onnxscript: torch.onnx's torch.export-based
        # exporter translates with it) and running those files (evaluate/detect/Predictor)
        "export": ["onnx", "onnxscript", "onnxruntime", "openvino"],
        # the CPU bench's peers: ONNX Runtime and OpenVINO run an ONNX export of the same weights
        "bench": ["onnx", "onnxscript", "onnxruntime", "openvino"],
        # (av, a runtime dependency, also encodes the tests' videos and is the decoding peer in
        # bench/); triton runs the kernels' tests on the CPU (TRITON_INTERPRET=1); onnx,
        # onnxscript, onnxruntime and openvino make and check the exports; scikit-learn (and its
        # scipy) is the oracle the anomaly-detection metrics are tested against; uv resolves the
        # runtime requirements for other platforms (tests/test_install.py)
        "dev": ["triton; platform_system=='Linux'", "pytest", "pytest-benchmark", "hypothesis", "nvtx", "ruff",
                "onnx", "onnxscript", "onnxruntime", "openvino", "scikit-learn", "uv"],
        # training runs also write TensorBoard event files (scalars, curves, confusion images)
        "tensorboard": ["tensorboard"],
    },
)
