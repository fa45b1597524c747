"""python -m llmga_core.downloads: see llmga_core/downloads/cli.py."""
from .cli import main

raise SystemExit(main())
