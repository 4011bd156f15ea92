#!/usr/bin/env bash
# The compose `audit-checkpoint` service: `unmask audit-checkpoint` now and then every
# AUDIT_CHECKPOINT_INTERVAL seconds (default 3600), the schedule docs/runbook.md asks of the
# checkpoint signer. A failed run is reported and tried again at the next tick: a checkpoint
# stored but not witnessed is witnessed by the next run, so nothing is lost by waiting.
#
# It is PID 1 of its container, so it ends on SIGTERM itself (`docker compose stop`), between
# runs at once and otherwise after the run in progress.
set -uo pipefail

interval=${AUDIT_CHECKPOINT_INTERVAL:-3600}
if [[ ! $interval =~ ^[1-9][0-9]*$ ]]; then
    echo "audit-checkpoint: AUDIT_CHECKPOINT_INTERVAL must be a whole number of seconds, not '$interval'" >&2
    exit 2
fi

sleeper=
stop() {
    [[ -n $sleeper ]] && kill "$sleeper" 2>/dev/null
    exit 0
}
trap stop TERM INT

while :; do
    unmask audit-checkpoint
    status=$?
    if [[ $status -ne 0 ]]; then
        echo "audit-checkpoint: failed (exit $status); next try in $interval s" >&2
    fi
    # In the background, so that the trap runs as soon as the signal comes.
    sleep "$interval" &
    sleeper=$!
    wait "$sleeper"
    sleeper=
done
