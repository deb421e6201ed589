import os

# The fused decode kernels (Triton) run on the CPU through Triton's interpreter; it is chosen when they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
