"""Data files shipped with kimi-local (tiny-model corpus, built-in chat template)."""
