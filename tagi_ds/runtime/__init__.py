"""Process and run-directory plumbing that every entry point shares (training, evaluation, export, the
planner's DeepSpeed settings, the benchmarks); it imports nothing from train/, eval/, export/ or the CLI.

``preflight``: the checks before anything is written or a process group starts, and the error contract (one
line, exit codes, printed once per job). ``dist``: rank discipline (the process group, barriers, rank-0 side
effects). ``engine``: the DeepSpeed glue (the JSON, what the config injects, the backbone under ZeRO-3, the
engine, ``place``). ``flags``: ``Parser``, argparse with the error contract, for every entry point.
``environment``: a free port and this Python environment's extensions dir (the launcher's too).
``rundir``: a run's start (process group, seed, ``config.json``) and atomic writes.
"""
