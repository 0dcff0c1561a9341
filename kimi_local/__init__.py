"""kimi-local: run Kimi-K2-Instruct (DeepSeek-V3 architecture, block-FP8) on one workstation."""

__version__ = "0.1.0"
