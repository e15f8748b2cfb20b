from setuptools import find_packages, setup

setup(
    name="fp8_deep",
    version="0.1.0",
    description="DeepSeek-V3 style FP8 (E4M3, 128x128 / 1x128 block scales) kernels for Mixture-of-Experts layers",
    packages=find_packages(include=["fp8_deep", "fp8_deep.*"]),
    # per-card tuned tile tables (fp8_deep/ops/_tuned.py), written by the tuning scripts under bench/
    package_data={"fp8_deep": ["configs/*/*.json"]},
    python_requires=">=3.10",
    # torch is deliberately unpinned here; CI pins the CPU build (torch==2.13.0) itself.
    install_requires=["torch>=2.4", "triton>=3.3", "numpy"],
    extras_require={
        "test": ["pytest>=7"],
        "bench": ["matplotlib", "pandas"],
        "vllm": ["vllm>=0.10"],
        # fp8_deep.export: checkpoint I/O, and transformers' fine-grained FP8 loader as a client (tests)
        "export": ["safetensors>=0.4.3"],
        "transformers": ["safetensors>=0.4.3", "transformers>=4.51", "accelerate"],
    },
)
