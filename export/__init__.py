"""Build-time toolchain: synthetic phantoms, training of the demonstration model, ONNX export.

This package may import torch; the runtime package ``appliance`` never does.
"""
