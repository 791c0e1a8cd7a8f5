import os

from setuptools import setup


def cpp_extension():
    """csrc/ as kernels._C (the C++ CPU backend), built against the installed torch; optional: without torch at
    build time (an isolated build) or a working compiler, the package installs without it and kernels warns once.
    Install with `pip install --no-build-isolation` so the build sees the environment's torch."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("sae-kernels: torch is not importable at build time; building without the C++ CPU kernels (csrc/)")
        return {}

    class OptionalBuild(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # no compiler, or headers missing: the PyTorch path runs instead
                print(f"sae-kernels: the C++ CPU kernels (csrc/) did not build ({e}); the PyTorch path runs instead")

    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
    # Built where it runs: the native ISA (SAE_KERNELS_MARCH=x86-64-v3 for valgrind, which lacks AVX-512).
    march = os.environ.get("SAE_KERNELS_MARCH", "native")
    flags = ["-O3", "-std=c++17", f"-march={march}", "-Wno-c++20-extensions"]
    ext = CppExtension("kernels._C", sources, extra_compile_args=flags, depends=["csrc/common.h", "csrc/tile_gemm.h"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuild.with_options(use_ninja=False)}}


setup(
    name="sae-kernels",
    version="0.1.0",
    description="Triton kernels for fast sparse autoencoders: fused TopK encode, sparse decode, sparse backward",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["kernels", "sae", "bench"],
    package_data={"kernels": ["configs/*.json"]},
    # Ranges satisfied by CI (torch 2.13.0 CPU, triton 3.9) and the GPU machine (torch 2.11, triton 3.6, numpy 2.5).
    install_requires=["torch>=2.5,<2.14", "triton>=3.2,<3.10", "numpy>=1.24,<3", "safetensors>=0.4"],
    extras_require={
        # Each feature's packages; "test" installs them all, so that no test skips in CI.
        "hub": ["huggingface_hub>=0.23", "pyyaml>=6"],
        "tensorboard": ["tensorboard>=2.12"],
        "wandb": ["wandb>=0.17"],
        "datasets": ["datasets>=2.19", "transformers>=4.40"],  # --dataset, training from a running model
        "evals": ["scipy>=1.10", "matplotlib>=3.7"],  # NNLS and optimal matching; the eval plots
        # selenium drives Debian's chromium and chromium-driver (.ci/run installs them) in the dashboard test
        "test": ["pytest>=7", "ruff>=0.5", "transformers>=4.40", "huggingface_hub>=0.23", "pyyaml>=6",
                 "tensorboard>=2.12", "wandb>=0.17", "datasets>=2.19",
                 "scipy>=1.10", "matplotlib>=3.7", "selenium>=4.10"],  # fmt: skip
        # eai-sparsify: the peer provider (on CPU through its eager decode)
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "nvidia-ml-py>=12", "eai-sparsify"],
        "peers": ["eai-sparsify"],
    },
    **cpp_extension(),
)
