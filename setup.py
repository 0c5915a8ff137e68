"""moeless: serverless experts for Mixture-of-Experts serving (Triton kernels + a thin control plane)."""
from setuptools import find_packages, setup

setup(
    name="moeless",
    version="0.1.0",
    description="Serverless experts for MoE LLM serving: Triton kernels, load predictors, scaling planner",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moeless", "moeless.*", "moeless_kernels", "moeless_kernels.*"]),
    include_package_data=True,
    package_data={"moeless": ["data/*", "data/**/*"], "moeless_kernels": ["configs/*"]},
    python_requires=">=3.10",
    # torch is deliberately unpinned above 2.4: `make` installs the CPU wheel (torch==2.13.0) first, and a GPU
    # machine keeps the torch it has; never let this line pull a CUDA build onto a CPU machine.
    # numba compiles the policy's per-layer loops (moeless/_jit.py: without it they run as plain Python, slower)
    install_requires=["torch>=2.4", "triton>=3.2", "numpy>=1.24", "numba>=0.60"],
    extras_require={
        "hf": ["transformers>=5.0"],
        "plots": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "hypothesis>=6.100", "scipy>=1.10", "pytest-benchmark>=4", "transformers>=5.0", "matplotlib>=3.7"],
        # the engines of the plug-ins in moeless/integrations (verified on these releases)
        "sglang": ["sglang>=0.5.23,<0.6"],
        "vllm": ["vllm>=0.33,<0.34"],
    },
    entry_points={
        "console_scripts": ["moeless=moeless.cli:main"],
        # engine plug-ins: SGLang's hooks pass everything through unless --eplb-algorithm moeless; vLLM's acts
        # only with MOELESS_VLLM_EPLB=1 (moeless/integrations/)
        "sglang.srt.plugins": ["moeless = moeless.integrations.sglang:register"],
        "vllm.general_plugins": ["moeless_eplb = moeless.integrations.vllm:register"],
    },
)
