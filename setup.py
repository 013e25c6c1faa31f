"""hvdinfer: distributed language-model inference and fine-tuning with Horovod + MPI on TF/Keras.

Horovod itself is built from source by `make install` (it must be compiled against the exact
TensorFlow in the environment), so it is not listed in install_requires.
"""
from setuptools import find_packages, setup

setup(
    name="hvdinfer",
    version="0.1.0",
    description="Distributed LM inference and fine-tuning with Horovod + MPI on TensorFlow/Keras",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["hvdinfer", "hvdinfer.*", "models", "models.*"]),
    install_requires=[
        "tensorflow-cpu==2.15.1",
        "numpy<2",
        "mpi4py",
        "safetensors",
        "tokenizers",
        "tqdm",
        "pyarrow>=17,<26",  # 26 needs NumPy 2
        "orjson>=3.9",
        "fastapi",
        "uvicorn",
        "httptools",
        "uvloop",
        "pydantic>=2",
        "prometheus-client",
    ],
    entry_points={"console_scripts": ["hvdinfer=hvdinfer.cli:entry"]},
)
