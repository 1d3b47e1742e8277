from setuptools import find_packages, setup

setup(
    name="megaseek",
    version="0.1.0",
    description="DeepSeek-style LLM pretraining: DeepSpeed + Megatron-style 3D parallelism, Hydra configs",
    packages=find_packages(include=["megaseek", "megaseek.*"]),
    python_requires=">=3.10",
    install_requires=[l.split("#")[0].strip() for l in open("requirements.txt") if l.split("#")[0].strip()],
)
