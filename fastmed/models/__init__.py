"""Complete models assembled from fastmed blocks."""
