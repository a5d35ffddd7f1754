# shellcheck shell=bash
# A private single-node Slurm cluster (munged, slurmctld, slurmd) for tests.
# Sourced, not run, by a script under `set -euo pipefail`:
#   slurm_check_host             the node's name (slurm_node), which must resolve
#   slurm_cluster_start <dir>    starts the cluster in that scratch folder and
#                                exports SLURM_CONF for the client commands;
#                                on failure slurm_error says why
#   slurm_cluster_logs           prints slurm.conf and the daemons' logs
#   slurm_cluster_stop           cancels any job, stops the daemons, removes
#                                the folder (safe to call at any point)
#
# Every file (munge key and socket, slurm.conf, state, spool, pids, logs)
# lives in the scratch folder and the ports are picked at start, so two runs
# never share anything and nothing under /etc is read or changed. The daemons
# run as the calling user, in the foreground, as children of this shell:
# their pids are known at once, a dead one is noticed, and a runner that
# kills this shell's process tree takes them too.

slurm_dir=
slurm_node=
slurm_error=
slurm_pids=()
declare -A slurm_names=()

slurm_fail() {
    # shellcheck disable=SC2034 # read by the sourcing script
    slurm_error=$*
    echo "slurm cluster: $*" >&2
    return 1
}

# srun hands the ranks a node list naming this host; rank 0's address is
# looked up from it, so the name must resolve.
slurm_check_host() {
    slurm_node=$(hostname -s)
    getent hosts "$slurm_node" >/dev/null ||
        slurm_fail "this host's name '$slurm_node' (hostname -s) does not resolve; add it to /etc/hosts"
}

# Two ports that were free a moment ago, between the Slurm steps' rendezvous
# ports (15000..24999) and the kernel's ephemeral ones (32768 and up), where
# nothing else of ours binds.
slurm_free_ports() {
    python3 - <<'EOF'
import random, socket
ports = []
while len(ports) < 2:
    p = random.randrange(25000, 32768)
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", p))
        if p not in ports:
            ports.append(p)
    except OSError:
        pass
    finally:
        s.close()
print(*ports)
EOF
}

slurm_started() {
    slurm_names[$2]=$1
    slurm_pids+=("$2")
}

# Fails unless every daemon started so far is still running.
slurm_daemons_alive() {
    local pid
    for pid in "${slurm_pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || slurm_fail "${slurm_names[$pid]} (pid $pid) has exited" || return 1
    done
}

slurm_cluster_start() {
    slurm_dir=$1
    local i user
    user=$(id -un)
    [[ -n $slurm_node ]] || slurm_check_host

    mkdir -p "$slurm_dir/state" "$slurm_dir/spool"
    # munged warns when its socket's folder is not searchable by all.
    chmod 755 "$slurm_dir"

    # munge: a fresh key, and a daemon of our own on a socket of our own.
    (umask 077 && dd if=/dev/urandom of="$slurm_dir/munge.key" bs=1024 count=1 status=none)
    # --force: munged refuses to run as root without it.
    munged --foreground --force --key-file="$slurm_dir/munge.key" --socket="$slurm_dir/munge.sock" \
        --pid-file="$slurm_dir/munged.pid" --log-file="$slurm_dir/munged.log" \
        --seed-file="$slurm_dir/munged.seed" >"$slurm_dir/munged.out" 2>&1 &
    slurm_started munged $!
    for ((i = 0; i < 50; i++)); do
        [[ -S $slurm_dir/munge.sock ]] && break
        slurm_daemons_alive
        sleep 0.1
    done
    munge -n -S "$slurm_dir/munge.sock" | unmunge -S "$slurm_dir/munge.sock" >/dev/null ||
        slurm_fail "munged does not answer on $slurm_dir/munge.sock"

    local ports ctld_port slurmd_port
    ports=$(slurm_free_ports)
    read -r ctld_port slurmd_port <<<"$ports"
    # A random first job id: the steps' rendezvous ports (derived from the
    # job id) differ from one run to the next.
    local first_job=$((1000 + RANDOM % 50000))
    # Foreign plugins configured under /etc are not ours to load.
    : >"$slurm_dir/plugstack.conf"
    cat >"$slurm_dir/slurm.conf" <<EOF
ClusterName=rpcagent-test
SlurmctldHost=$slurm_node
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
# The calling user runs everything (root in CI); jobs run as that user.
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$slurm_dir/munge.sock
StateSaveLocation=$slurm_dir/state
SlurmdSpoolDir=$slurm_dir/spool
SlurmctldPidFile=$slurm_dir/slurmctld.pid
SlurmdPidFile=$slurm_dir/slurmd.pid
SlurmctldLogFile=$slurm_dir/slurmctld.log
SlurmdLogFile=$slurm_dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$slurm_dir/plugstack.conf
MailProg=/bin/true
# No cgroups (containers, gVisor): processes are tracked through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
FirstJobId=$first_job
# The node is idle as soon as slurmd registers, whatever the state says.
ReturnToService=2
# The node is what this file says, not what hwloc finds (it fails in gVisor).
SlurmdParameters=config_overrides
NodeName=$slurm_node CPUs=$(nproc) State=UNKNOWN
# Jobs share the CPUs: concurrent worlds, more ranks than CPUs.
PartitionName=test Nodes=$slurm_node Default=YES MaxTime=10 OverSubscribe=FORCE State=UP
EOF
    export SLURM_CONF=$slurm_dir/slurm.conf

    slurmctld -D -f "$SLURM_CONF" >"$slurm_dir/slurmctld.out" 2>&1 &
    slurm_started slurmctld $!
    slurmd -D -f "$SLURM_CONF" -N "$slurm_node" >"$slurm_dir/slurmd.out" 2>&1 &
    slurm_started slurmd $!

    # Up when the controller reports the node idle (slurmd registered)...
    local state=
    for ((i = 0; i < 100; i++)); do
        slurm_daemons_alive
        state=$(timeout 5 sinfo -h -N -n "$slurm_node" -o %t 2>/dev/null || true)
        [[ $state == idle ]] && break
        sleep 0.2
    done
    [[ $state == idle ]] || slurm_fail "node $slurm_node not idle after 20 s (state: '${state:-no answer}')"
    # ... and a job step runs: a cluster that cannot start one is not up.
    timeout -k 5 20 srun -N1 -n1 true </dev/null >"$slurm_dir/probe.out" 2>&1 ||
        slurm_fail "srun -n1 true fails: $(tr '\n' ' ' <"$slurm_dir/probe.out")"
}

slurm_cluster_logs() {
    local d f
    [[ -n $slurm_dir && -d $slurm_dir ]] || return 0
    [[ -s $slurm_dir/slurm.conf ]] && echo "----- slurm.conf -----" && cat "$slurm_dir/slurm.conf"
    for d in munged slurmctld slurmd; do
        # A daemon's log file, or its stderr when it has none (munged in the
        # foreground, a daemon dead before opening its log).
        f=$d.log
        [[ -s $slurm_dir/$f ]] || f=$d.out
        [[ -s $slurm_dir/$f ]] || continue
        echo "----- $f (last 60 lines) -----"
        tail -n 60 "$slurm_dir/$f"
    done
}

slurm_cluster_stop() {
    local pid i jobs
    # Jobs first, while slurmd can still end their steps (a step whose slurmd
    # is gone lingers).
    if ((${#slurm_pids[@]} == 3)) && slurm_daemons_alive 2>/dev/null; then
        jobs=$(timeout 5 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086 # one word per job id
            timeout 5 scancel --full $jobs 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    # Then the daemons, newest first; killed outright if TERM is not enough.
    for ((i = ${#slurm_pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${slurm_pids[i]}" 2>/dev/null || true
    done
    for pid in "${slurm_pids[@]}"; do
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    slurm_pids=()
    slurm_names=()
    if [[ -n $slurm_dir ]]; then
        rm -rf "$slurm_dir"
    fi
    slurm_dir=
}
