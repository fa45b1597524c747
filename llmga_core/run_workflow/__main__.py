"""python -m llmga_core.run_workflow: see llmga_core/run_workflow/cli.py."""
from .cli import main

raise SystemExit(main())
