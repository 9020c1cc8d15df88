"""Crab+: a unified audio-visual LLM recipe built on ilora (arXiv 2603.04128)."""
