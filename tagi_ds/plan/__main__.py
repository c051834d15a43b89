"""``python -m tagi_ds.plan``: the planner's command line (tagi_ds/plan/cli.py)."""

from tagi_ds.plan.cli import main

if __name__ == "__main__":
    main()
