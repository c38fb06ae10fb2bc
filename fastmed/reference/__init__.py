"""Plain PyTorch references for every fastmed op: the test oracles and the CPU fallbacks."""
