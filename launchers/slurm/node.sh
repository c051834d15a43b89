#!/usr/bin/env bash
# Per-node half of launchers/slurm/*.sbatch: srun runs this once on every node (--ntasks-per-node=1).
#
#   bash launchers/slurm/node.sh deepspeed [deepspeed options] launchers/<stage>.py [launcher args]
#
# Inserts this node's `--node_rank $SLURM_NODEID` after the `deepspeed` word (the value differs per node,
# so the batch shell cannot expand it), starts the launcher in its own process group with SIGUSR1
# ignored, and relays SIGUSR1 / SIGTERM to that whole group — the DeepSpeed runner and launcher ignore
# SIGUSR1, the training processes handle it (stop-and-save contract: see common.sh).
set -uo pipefail

node_rank=${SLURM_NODEID:?node.sh must run under srun (SLURM_NODEID is unset)}
(($# >= 2)) || {
	echo "usage: node.sh deepspeed [options] script [args]" >&2
	exit 2
}
cmd=("$1" --node_rank "$node_rank" "${@:2}")
echo "tagi-slurm[node $node_rank $(hostname)]: ${cmd[*]}" >&2

# shellcheck disable=SC2329  # called from the traps below
relay() {
	# Negative pid: the whole process group (runner, launcher, every rank on this node).
	[[ -n ${group:-} ]] && kill -"$1" -- "-$group" 2>/dev/null
	return 0
}
group=
trap 'relay USR1' USR1
trap 'relay TERM' TERM

# Job control on for one launch: the background job becomes its own process group (pgid = its pid).
set -m
(
	trap '' USR1
	exec "${cmd[@]}"
) &
group=$!
set +m

while :; do
	wait "$group" && rc=0 || rc=$?
	kill -0 "$group" 2>/dev/null || break
done
wait "$group" 2>/dev/null && final=0 || final=$?
((final == 127)) || rc=$final
exit "$rc"
