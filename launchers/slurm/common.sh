# shellcheck shell=bash
# Shared body of launchers/slurm/*.sbatch — sourced by them, not run on its own.
#
# One job = one srun task per node, each starting DeepSpeed's own launcher for that node (no torchrun,
# no ssh between nodes):
#
#   batch shell (first node, this file)
#     └─ srun --ntasks-per-node=1 bash launchers/slurm/node.sh deepspeed ...        (every node)
#          └─ deepspeed --hostfile H --num_nodes N --num_gpus G --node_rank $SLURM_NODEID
#                       --master_addr <first host> --master_port P --no_ssh launchers/<stage>.py ...
#               └─ python -m deepspeed.launcher.launch ─ one training process per GPU
#
# Environment (all optional):
#   OUT            run directory (default runs/<stage>-$SLURM_JOB_ID; a requeued job keeps its id, so its dir)
#   RECIPE         --recipe (default t5-xl)
#   DATA           --data spec (default per stage, see each .sbatch)
#   DS_CONFIG      --deepspeed (default ds_configs/z3.json)
#   GPUS_PER_NODE  ranks per node (default $SLURM_GPUS_ON_NODE, else 8)
#   EXTRA_ARGS     more launcher flags, split on whitespace (arguments given to sbatch after the script
#                  name are passed through verbatim as well, after EXTRA_ARGS)
#   TAGI_MASTER_PORT  rendezvous port (default 20000 + SLURM_JOB_ID % 20000: two jobs sharing a node differ)
#   TAGI_MASTER_ADDR  rendezvous host (default: the first host of the allocation). Deliberately not the
#                  plain MASTER_ADDR/MASTER_PORT, which a submitting shell often exports from elsewhere.
#   REQUEUE        1 (default): after a SIGUSR1 stop, requeue the job so it resumes; 0: just exit
#   TAGI_ROOT      repository root (default $SLURM_SUBMIT_DIR: submit from the repository root)
#
# Resume: when $OUT/checkpoints/latest exists (the launchers write it atomically after each save), the
# training stages add `--resume_from_checkpoint latest`, so a requeued or resubmitted job continues.
#
# Stop-and-save contract (time limit, preemption):
#   `#SBATCH --signal=B:USR1@300` makes Slurm send SIGUSR1 to the batch shell 300 s before the limit.
#   The trap below forwards it to srun, srun forwards it to node.sh on every node, and node.sh sends it
#   to its whole DeepSpeed process group. The DeepSpeed runner and deepspeed.launcher.launch run with
#   SIGUSR1 *ignored* (they have no handler and would otherwise die, taking the ranks down), and the
#   training processes inherit that disposition — so launchers/*.py MUST install their own handler:
#   on SIGUSR1 or SIGTERM, set a flag; the loop finishes its optimizer step, agrees on stopping with the
#   other ranks (ranks get the signal at slightly different moments: e.g. all-reduce the flag with MAX
#   every step), saves a checkpoint (and checkpoints/latest) collectively, and exits 0. The handler may
#   fire more than once (Slurm may also signal every process of the step); only the first matters.
#   After srun returns 0, a job stopped by SIGUSR1 requeues itself (REQUEUE=1).
#   SIGTERM (scancel, preemption, the hard limit; SIGKILL follows after KillWait, ~30 s) is forwarded the
#   same way, best effort, and never leads to a requeue (Slurm requeues preempted jobs itself).

tagi_log() { echo "tagi-slurm: $*" >&2; }
tagi_die() {
	echo "tagi-slurm: error: $*" >&2
	exit 2
}

# tagi_main STAGE DEFAULT_DATA RESUME [launcher args...]
#   STAGE: launchers/STAGE.py; RESUME: 1 = add --resume_from_checkpoint latest when a checkpoint exists.
tagi_main() {
	local stage=$1 default_data=$2 resume=$3
	shift 3
	[[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] || tagi_die "not inside a Slurm job: submit with sbatch"
	local launcher="launchers/${stage}.py"
	[[ -f $launcher ]] || tagi_die "$launcher not found in $PWD (set TAGI_ROOT or submit from the repository root)"

	OUT=${OUT:-runs/${stage}-${SLURM_JOB_ID}}
	RECIPE=${RECIPE:-t5-xl}
	DATA=${DATA:-$default_data}
	DS_CONFIG=${DS_CONFIG:-ds_configs/z3.json}
	GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
	REQUEUE=${REQUEUE:-1}
	[[ -f $DS_CONFIG ]] || tagi_die "DS_CONFIG=$DS_CONFIG: no such file"
	[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || tagi_die "GPUS_PER_NODE=$GPUS_PER_NODE: expected a positive integer"

	local hosts
	mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
	((${#hosts[@]} > 0)) || tagi_die "scontrol show hostnames $SLURM_JOB_NODELIST returned no hosts"
	local nnodes=${SLURM_NNODES:-${#hosts[@]}}
	((nnodes <= ${#hosts[@]})) || tagi_die "SLURM_NNODES=$nnodes but the node list has ${#hosts[@]} hosts"
	local master_addr=${TAGI_MASTER_ADDR:-${hosts[0]}}
	local master_port=${TAGI_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

	# deepspeed --no_ssh still reads the node list from a hostfile (without one it refuses --num_nodes > 1);
	# OUT must be on a filesystem every node sees anyway (ZeRO checkpoints are written by all ranks).
	mkdir -p "$OUT/slurm" || tagi_die "cannot create $OUT/slurm"
	local hostfile="$OUT/slurm/hostfile-${SLURM_JOB_ID}"
	local h
	for h in "${hosts[@]:0:nnodes}"; do
		echo "$h slots=$GPUS_PER_NODE"
	done >"$hostfile"

	local -a args=(--deepspeed "$DS_CONFIG" --recipe "$RECIPE" --data "$DATA" --output_dir "$OUT")
	if [[ $resume == 1 && -f $OUT/checkpoints/latest ]]; then
		args+=(--resume_from_checkpoint latest)
		tagi_log "resuming from $OUT/checkpoints/latest ($(<"$OUT/checkpoints/latest"))"
	fi
	local -a extra=()
	read -r -a extra <<<"${EXTRA_ARGS:-}"
	args+=(${extra[@]+"${extra[@]}"} "$@")

	local -a cmd=(deepspeed --hostfile "$hostfile" --num_nodes "$nnodes" --num_gpus "$GPUS_PER_NODE"
		--master_addr "$master_addr" --master_port "$master_port" --no_ssh "$launcher" "${args[@]}")
	tagi_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $GPUS_PER_NODE GPU(s), master $master_addr:$master_port"
	tagi_log "per node: ${cmd[*]} (node.sh adds --node_rank \$SLURM_NODEID)"

	# Slurm >= 22.05: srun no longer inherits --cpus-per-task from the allocation.
	[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

	TAGI_STOP_REQUESTED=0
	TAGI_SRUN_PID=
	trap 'tagi_forward USR1' USR1
	trap 'tagi_forward TERM' TERM
	# In the background, so the traps run while we wait (bash defers traps until a foreground child exits).
	srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
		bash launchers/slurm/node.sh "${cmd[@]}" &
	TAGI_SRUN_PID=$!
	tagi_wait "$TAGI_SRUN_PID"
	local rc=$TAGI_RC
	trap - USR1 TERM

	if ((TAGI_STOP_REQUESTED)) && ((rc == 0)) && [[ $REQUEUE == 1 ]]; then
		tagi_log "stopped and saved before the time limit: requeueing job $SLURM_JOB_ID"
		scontrol requeue "$SLURM_JOB_ID" || tagi_log "scontrol requeue failed: resubmit to resume from $OUT"
	fi
	tagi_log "srun exited with status $rc"
	exit "$rc"
}

tagi_forward() {
	# Only the early-warning USR1 leads to a requeue; TERM means scancel, preemption or the hard limit.
	[[ $1 == USR1 ]] && TAGI_STOP_REQUESTED=1
	tagi_log "got SIG$1: asking every rank to save and exit"
	[[ -n ${TAGI_SRUN_PID:-} ]] && kill -"$1" "$TAGI_SRUN_PID" 2>/dev/null
	return 0
}

# Wait for background PID and set TAGI_RC to its exit status (not in a $(...) subshell: only this shell
# can wait for its children). `wait` returns early (status > 128) whenever a trapped signal arrives, so
# wait again until the process is really gone, then collect its own status once more.
tagi_wait() {
	local pid=$1 rc=0 final
	while :; do
		wait "$pid" && rc=0 || rc=$?
		kill -0 "$pid" 2>/dev/null || break
	done
	wait "$pid" 2>/dev/null && final=0 || final=$?
	((final == 127)) || rc=$final # 127: status already collected (older bash keeps it only once)
	TAGI_RC=$rc
}
