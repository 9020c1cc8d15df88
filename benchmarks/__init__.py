"""Benchmark suite of ilora: routed-LoRA providers timed side by side (see benchmarks/README.md)."""
