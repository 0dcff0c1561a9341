#!/usr/bin/env python3
"""`python cli.py ...` is the same as the `kimi-local` command (see kimi_local/cli.py)."""
import sys

from kimi_local.cli import main

if __name__ == "__main__":
    sys.exit(main())
