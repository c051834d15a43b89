"""Process and run-directory plumbing that every entry point shares (training, evaluation, export, the
planner's DeepSpeed settings, the benchmarks).

``preflight``: the checks before anything is written or a process group starts, and the error contract (one
line, exit codes, printed once per job). ``dist``: rank discipline (joining the process group, barriers, rank-0
side effects). ``engine``: the DeepSpeed glue (the JSON, what the config injects, the backbone under ZeRO-3, the
engine, ``place``).
"""
