"""The one home of fastmed's version: read by ``fastmed.__version__`` and by pyproject.toml (dynamic version)."""
__version__ = "0.1.0"
