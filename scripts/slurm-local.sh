#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, then the sweep test through submitit against it
# (`make test-slurm`). Needs root (it installs Debian's slurm-wlm and munge with apt-get when
# they are missing, and starts munged, slurmctld and slurmd); everything it starts is
# stopped again on exit, by the process ids it recorded.
#
#   scripts/slurm-local.sh [PYTHON]     PYTHON: the interpreter with spillover installed
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
STATE=${SLURM_LOCAL_DIR:-/tmp/spillover-slurm}

fail() { echo "slurm-local: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (apt-get, munged, slurmd); run it in a container or a VM"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || fail "slurm-wlm is not installed and there is no apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

rm -rf "$STATE"
mkdir -p "$STATE"/{state,spool,log} /run/munge
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# munge: the key the package made, else a fresh one
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
chown -R munge: /etc/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
munged --force --pid-file "$STATE/munged.pid" --socket /run/munge/munge.socket.2 \
  || fail "munged did not start"
sleep 1
pids+=("$(cat "$STATE/munged.pid")")

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
export SLURM_CONF="$STATE/slurm.conf"
# One node, no cgroups (a container has none to give), no accounting database: submitit
# then waits on its result files (its sacct calls fail and are bypassed).
cat > "$SLURM_CONF" <<EOF
ClusterName=spillover-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start (see $STATE/log/slurmctld.log)"
sleep 2
[ -s "$STATE/slurmctld.pid" ] || fail "slurmctld exited (see $STATE/log/slurmctld.log)"
pids+=("$(cat "$STATE/slurmctld.pid")")
slurmd -f "$SLURM_CONF" || fail "slurmd did not start (see $STATE/log/slurmd.log)"
sleep 2
[ -s "$STATE/slurmd.pid" ] || fail "slurmd exited (see $STATE/log/slurmd.log)"
pids+=("$(cat "$STATE/slurmd.pid")")

for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed)'; then break; fi
  sleep 1
done
sinfo -h -o %T | grep -Eq '^(idle|mixed)' \
  || fail "the node never became idle: $(sinfo -h -o '%T %E' 2>&1 | head -1) (see $STATE/log/)"
echo "slurm-local: one-node cluster up ($host, $cpus CPUs)"
srun -N1 -t 1 true || fail "srun could not run a job (see $STATE/log/slurmd.log)"

SPILLOVER_TEST_SLURM=1 "$PYTHON" -m pytest -q -p no:randomly tests/test_executors.py -k slurm_cluster
