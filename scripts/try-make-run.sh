#!/usr/bin/env bash
# Do what a new user does: `make run`, copy the banner's submit curl, watch the ticket complete,
# read the stats, press Ctrl-C. Exits non-zero when any step fails.
# Usage: scripts/try-make-run.sh [RUN_ARGS...]   e.g. FDQUEUE_PORT=3100 scripts/try-make-run.sh
set -euo pipefail
set -m  # job control: `make run` gets its own process group, as in a terminal
cd "$(dirname "$0")/.."

log=$(mktemp)
make run RUN_ARGS="$*" >"$log" 2>&1 &
make_pid=$!
set +m  # no job notices in the output; make keeps its own process group
stop() {  # Ctrl-C: SIGINT to the foreground process group (make and fdqueue dev)
    if kill -0 "$make_pid" 2>/dev/null; then
        kill -INT -- "-$make_pid"
        wait "$make_pid" || true
    fi
}
trap 'stop; rm -f "$log"' EXIT

for _ in $(seq 1800); do
    grep -q "Ctrl-C to stop" "$log" && break
    kill -0 "$make_pid" 2>/dev/null || { cat "$log"; echo "make run exited early" >&2; exit 1; }
    sleep 0.1
done
grep -q "Ctrl-C to stop" "$log" || { cat "$log"; echo "no banner after 180 s" >&2; exit 1; }
sed -n '/^=====/,/^=====/p' "$log"

# The banner's submit curl, continuation lines joined, run as printed.
submit=$(sed -n '/Submit a ticket:/,/Read the stats:/p' "$log" | sed '1d;$d' | sed 's/\\$//' | tr -d '\n')
stats=$(sed -n '/Read the stats:/{n;p}' "$log")
api=$(sed -n 's/^ *API *\(http[^ ]*\).*/\1/p' "$log" | head -n1)

reply=$(eval "$submit -w '\n%{http_code}'")
code=$(tail -n1 <<<"$reply")
body=$(head -n1 <<<"$reply")
accepted=$(date +%s.%N)
echo "submit: HTTP $code $body"
[ "$code" = 202 ] || exit 1
[[ $body =~ \"status_url\":\ \"([^\"]+)\" ]] || exit 1
status_url=${BASH_REMATCH[1]}

state=""
for _ in $(seq 3000); do
    state=$(curl -sS "$api$status_url")
    case "$state" in *'"status": "completed"'* | *'"status": "failed"'*) break ;; esac
    sleep 0.01
done
done_at=$(date +%s.%N)
echo "status: $state"
python3 -c 'import sys; print(f"202 -> final in {(float(sys.argv[2]) - float(sys.argv[1])) * 1000:.0f} ms")' \
    "$accepted" "$done_at"
echo "stats: $(eval "$stats")"
case "$state" in *'"status": "completed"'*'"freshdesk_ticket_id": '[0-9]*) ;; *) exit 1 ;; esac

stop
echo "--- last lines of make run ---"
tail -n 8 "$log"
