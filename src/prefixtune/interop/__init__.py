"""Interoperability: PEFT adapter folders, HF-style prefix folders with model cards, the hub."""
