#!/usr/bin/env bash
# Stop the slurmctld and slurmd that tests/slurm/start.sh started with this FOLDER (default /tmp/camal-slurm), by their
# pid files; munged is left running (other programs may use it).
set -uo pipefail
folder=$(realpath -m "${1:-/tmp/camal-slurm}")
for daemon in slurmd slurmctld; do
  pidfile="$folder/$daemon.pid"
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill "$pid" 2> /dev/null && for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.2; done
    rm -f "$pidfile"
  fi
done
