"""Triton kernels for routed LoRA, installed as ``ilora.kernels``."""
