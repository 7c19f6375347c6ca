#!/usr/bin/env bash
# Supervised Prefect worker: restarts `prefect worker start --pool POOL` whenever it exits (crash, SIGKILL, OOM,
# lost server), with exponential backoff, so that `prefect flow-run retry` of a crashed run never waits for a hand.
# SIGTERM / SIGINT / SIGHUP to this script are forwarded to the worker, which is waited for: no orphaned worker.
#
# Usage, from the repository root with the project's venv active (or PREFECT=/path/to/.venv/bin/prefect):
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api deployments/worker-supervised.sh [--pool bitdistill-process] [-- WORKER ARGS]
#
# Environment:
#   PREFECT                      the prefect executable (default: `prefect` on PATH)
#   BITDISTILL_WORKER_POOL       the work pool (default bitdistill-process; --pool overrides it)
#   BITDISTILL_RESTART_MIN_S     first restart delay, seconds (default 1); doubled after each quick exit ...
#   BITDISTILL_RESTART_MAX_S     ... up to this (default 60)
#   BITDISTILL_RESTART_RESET_S   a worker that ran this long restarts after the first delay again (default 60)
#   BITDISTILL_STOP_GRACE_S      after the forwarded SIGTERM, SIGKILL the worker if it has not exited in this
#                                many seconds (default 30; a stopping Prefect worker can hang on its shutdown)
# The systemd equivalent: deployments/bitdistill-worker.service (Restart=always).
set -u

pool="${BITDISTILL_WORKER_POOL:-bitdistill-process}"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --pool) pool="$2"; shift 2 ;;
        --pool=*) pool="${1#--pool=}"; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#'; exit 0 ;;
        *) echo "worker-supervised: unknown argument $1 (worker arguments go after --)" >&2; exit 2 ;;
    esac
done

prefect="${PREFECT:-prefect}"
min="${BITDISTILL_RESTART_MIN_S:-1}"
max="${BITDISTILL_RESTART_MAX_S:-60}"
reset="${BITDISTILL_RESTART_RESET_S:-60}"
grace="${BITDISTILL_STOP_GRACE_S:-30}"
delay="$min"
child=""
stopping=0
watchdog=""

on_signal() {
    [ "$stopping" -eq 1 ] && return
    stopping=1
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        log "stopping: SIGTERM to the worker (PID $child), SIGKILL after ${grace} s"
        kill -TERM "$child" 2>/dev/null
        ( trap 'kill "$s" 2>/dev/null; exit 0' TERM
          sleep "$grace" & s=$!; wait "$s" && kill -KILL "$child" 2>/dev/null ) &
        watchdog=$!
    fi
}
trap on_signal TERM INT HUP

log() { echo "worker-supervised[$$] $(date -u +%Y-%m-%dT%H:%M:%SZ): $*" >&2; }

while [ "$stopping" -eq 0 ]; do
    started=$(date +%s)
    log "starting: $prefect worker start --pool $pool ${extra[*]:-}"
    "$prefect" worker start --pool "$pool" ${extra[@]+"${extra[@]}"} &
    child=$!
    # `wait` returns early when a trapped signal arrives: wait again until the worker has really exited
    wait "$child"
    rc=$?
    while kill -0 "$child" 2>/dev/null; do
        wait "$child"
        rc=$?
    done
    child=""
    [ "$stopping" -eq 1 ] && break
    ran=$(( $(date +%s) - started ))
    if [ "$ran" -ge "$reset" ]; then delay="$min"; fi
    log "worker exited with status $rc after ${ran} s; restarting in ${delay} s"
    sleep "$delay" &
    sleeper=$!
    wait "$sleeper" 2>/dev/null
    kill "$sleeper" 2>/dev/null
    delay=$(( delay * 2 > max ? max : delay * 2 ))
done
[ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
log "stopped"
exit 0
