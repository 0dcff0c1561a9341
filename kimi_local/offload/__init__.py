"""Offload: placement of weights across GPU, host RAM and disk, and the routed-expert cache.

Modules: ``placement`` (the plan), ``plan_cli`` / ``doctor`` / ``cachesim`` (subcommands),
``policies`` (cache eviction policies), ``predictor`` (next-experts prediction and its precision/recall),
``traces`` (routing trace files and synthetic K2-shaped traces).  Importing this package does nothing.
"""
