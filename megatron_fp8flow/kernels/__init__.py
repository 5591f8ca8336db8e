"""Triton kernels for the FP8 dataflow. Each module holds one operation and names its reference.

Import only where Triton can run: on a CUDA device, or on CPU with ``TRITON_INTERPRET=1``.
"""
