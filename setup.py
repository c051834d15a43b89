"""tagi-ds: DeepSpeed training system for TAGI (Task Adapters Generation from Instructions)."""

from setuptools import find_packages, setup

setup(
    name="tagi-ds",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 training of hypernetworks that generate LoRA adapters from task instructions",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is a plain folder (no __init__.py) holding the package tagi_kernels: a regular package named
    # "kernels" would shadow Hugging Face's `kernels` (which transformers imports) whenever the repository
    # root is on sys.path; a namespace portion never wins over an installed regular package.
    packages=find_packages(include=["tagi_ds", "tagi_ds.*"]) + ["tagi_kernels"],
    package_dir={"tagi_kernels": "kernels/tagi_kernels"},
    package_data={"tagi_ds": ["assets/*"]},
    install_requires=[
        "torch>=2.4",  # install torch first (CPU: torch==2.13.0) so this pulls nothing
        "deepspeed>=0.16",
        "transformers>=5.0",  # 5.x APIs (dtype=, Cache.layers, EncoderDecoderCache); tested with 5.23
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "rich>=13",
        "triton>=3.0",
        "safetensors>=0.4",
        "numpy",
        "psutil",  # free memory before --measure; the launcher check (deepspeed needs it too)
        "nltk",  # Porter stemmer for ROUGE-L (the one rouge-score uses)
        "fastapi>=0.110",  # python -m tagi_ds.serve: the HTTP API (ASGI)
        "uvicorn>=0.29",  # ... and its server
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "test": [
            "pytest>=8", "pytest-timeout", "peft>=0.13", "rouge-score>=0.1.2", "kernels", "pytest-xdist",
            "ruff>=0.17.6,<0.18",  # tests/core/test_style.py: a new minor version may change the format or add rules
            "openai",  # tests/serve: the OpenAI client against the server
        ],
        "plot": ["matplotlib"],
    },
)
