#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying benchmark.py --backend slurm on a laptop and for the tests.
#
#   sudo apt-get install slurm-wlm munge          # Debian/Ubuntu packages (SLURM 22.05 on Debian 12)
#   sudo tests/slurm/start.sh [FOLDER]            # FOLDER (default /tmp/camal-slurm): config, state, logs, pids
#   export SLURM_CONF=FOLDER/slurm.conf           # what the script prints; sbatch, squeue and submitit then find it
#   sudo tests/slurm/stop.sh [FOLDER]             # stops the daemons this script started
#
# It starts munged (authentication) unless one answers already, then slurmctld (the controller) and slurmd (the node)
# on this machine: one node named after `hostname`, all its CPUs, a little less memory than it has, no GPUs, no cgroups,
# no accounting database (benchmark.py reads job states from squeue, not sacct). Run as root: the daemons and the jobs
# run as root. Exit code 0 once `sinfo` shows the node idle; 1 with the daemon's log otherwise.
set -euo pipefail
folder=$(realpath -m "${1:-/tmp/camal-slurm}")
if [ "$(id -u)" != 0 ]; then
  echo "error: run as root (the SLURM daemons and munged need it): sudo $0 $*" >&2
  exit 2
fi
for cmd in slurmctld slurmd munged sinfo; do
  command -v "$cmd" > /dev/null || { echo "error: $cmd not found: apt-get install slurm-wlm munge" >&2; exit 2; }
done
mkdir -p "$folder"/{state,spool,log}

# munge: a key readable by the munge user only, its socket folder, the daemon as that user
if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged --force
  for _ in $(seq 50); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.2; done
fi
munge -n | unmunge > /dev/null || { echo "error: munged does not answer" >&2; exit 1; }

node=$(hostname)
cpus=$(nproc)
memory=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 ))
cat > "$folder/slurm.conf" << EOF
ClusterName=camal
SlurmctldHost=$node
SlurmUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$folder/state
SlurmdSpoolDir=$folder/spool
SlurmctldPidFile=$folder/slurmctld.pid
SlurmdPidFile=$folder/slurmd.pid
SlurmctldLogFile=$folder/log/slurmctld.log
SlurmdLogFile=$folder/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a node taken down by scontrol stays down until resumed; one that stopped answering returns when its slurmd does
ReturnToService=1
# a signalled or pre-empted task is killed 15 s after its SIGTERM (time to save a checkpoint; SLURM's default is 30 s)
KillWait=15
MinJobAge=600
SchedulerType=sched/backfill
SchedulerTimeSlice=30
NodeName=$node CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$folder/slurm.conf"

for daemon in slurmctld slurmd; do
  if [ -s "$folder/$daemon.pid" ] && kill -0 "$(cat "$folder/$daemon.pid")" 2> /dev/null; then
    continue  # started by an earlier call with this folder
  fi
  "$daemon" -f "$SLURM_CONF"
done
for _ in $(seq 120); do
  if sinfo -h -N -o "%T" 2> /dev/null | grep -qx idle; then
    echo "SLURM is up: node $node, $cpus CPUs, ${memory} MB; state, logs and pids in $folder"
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  scontrol update nodename="$node" state=resume > /dev/null 2>&1 || true  # a node left down by an earlier session
  sleep 0.5
done
echo "error: the node did not come up within a minute; the daemons' logs:" >&2
tail -n 20 "$folder"/log/*.log >&2
exit 1
