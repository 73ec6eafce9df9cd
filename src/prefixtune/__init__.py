"""prefixtune: Prefix-Tuning (Li & Liang, 2021) of frozen language models."""
__version__ = "0.1.0"
