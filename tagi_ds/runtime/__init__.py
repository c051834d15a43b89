"""What every entry point does around its work: check all inputs first, report failures in one style.

``preflight``: the checks (output dir, DeepSpeed JSON, safetensors headers, artifacts, checkpoints, the model
on the meta device) and the error contract (one line, exit codes, printed once per job).
"""
