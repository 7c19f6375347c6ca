"""Fast paths for BitLinear (Triton kernels + PyTorch reference, dispatch). bitnet/ works without them."""
