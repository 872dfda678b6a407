#!/usr/bin/env bash
# Runs partyhost's benchmark suite with one command: builds the server and
# the load client in release mode, then runs every scenario against a fresh
# server on 127.0.0.1, several times each, and prints the medians as
# Markdown tables. Server and client are pinned to separate CPUs.
#
# Environment (all optional):
#   BENCH_RUNS         runs per scenario and size (default 3)
#   BENCH_OUT          folder for logs and JSON reports
#                      (default target/bench/<date-time>)
#   BENCH_SERVER_CPUS  CPU list the server is pinned to (default 0)
#   BENCH_CLIENT_CPUS  CPU list the load client is pinned to (default 1)
#   PARTYHOST          server binary to measure instead of building the
#                      workspace's; it must accept partyhost's options
#   BENCH_SCENARIOS    scenarios to run, from "fanout connections rooms
#                      guest" (default all)
#   BENCH_QUICK=1      one run at small sizes, as a smoke test
#
# Every socket targets 127.0.0.0/8. Every step is bounded in count and time;
# the whole suite takes about 12 minutes on 2 cores.
set -euo pipefail

cd "$(dirname "$0")/.."
workspace=$(pwd)

runs=${BENCH_RUNS:-3}
server_cpus=${BENCH_SERVER_CPUS:-0}
client_cpus=${BENCH_CLIENT_CPUS:-1}
out=${BENCH_OUT:-$workspace/target/bench/$(date +%Y%m%d-%H%M%S)}
quick=${BENCH_QUICK:-0}
scenarios=" ${BENCH_SCENARIOS:-fanout connections rooms guest} "
mkdir -p "$out"

# Every socket needs a descriptor, in the server and in the client.
ulimit -n "$(ulimit -Hn)"
open_files=$(ulimit -n)

pin_server=()
pin_client=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    pin_server=(taskset -c "$server_cpus")
    pin_client=(taskset -c "$client_cpus")
fi

echo "== building partyhost and partyhost-bench (release)"
if [ -z "${PARTYHOST:-}" ]; then
    cargo build --release -p partyhost -p partyhost-bench
    PARTYHOST=$workspace/target/release/partyhost
else
    cargo build --release -p partyhost-bench
fi
bench=$workspace/target/release/partyhost-bench
if [[ $scenarios == *" guest "* ]]; then
    cargo bench -p partyhost-bench --bench guest_call --no-run
fi

# Options that lift the server's own connection caps, where it has them:
# the load client paces itself.
server_options=(--shards 5)
if "$PARTYHOST" --help | grep -q -- '--max-connections '; then
    server_options+=(--max-connections 200000 --max-connections-per-room 200000)
fi
if "$PARTYHOST" --help | grep -q -- '--connect-rate'; then
    server_options+=(--connect-rate 100000 --connect-burst 10000)
fi

server_pid=""
server_addr=""

stop_server() {
    [ -n "$server_pid" ] || return 0
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}
trap stop_server EXIT

# start_server LOG [OPTION...]: starts a server on a free loopback port and
# sets server_pid and server_addr.
start_server() {
    local log=$1
    shift
    "${pin_server[@]}" "$PARTYHOST" --listen 127.0.0.1:0 "${server_options[@]}" "$@" 2>"$log" &
    server_pid=$!
    for _ in $(seq 1 300); do
        server_addr=$(grep -o 'listening on http://[0-9.:]*' "$log" | head -n 1 | sed 's#.*http://##') || true
        [ -n "$server_addr" ] && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "error: the server did not start within 30 s; its log:" >&2
    cat "$log" >&2
    exit 1
}

client() {
    "${pin_client[@]}" "$bench" "$@"
}

{
    echo "machine: $(nproc) CPUs, $(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/^Mem:/ {print $2}') GiB"
    echo "kernel: $(uname -r); open file limit: $open_files"
    echo "server: $PARTYHOST ${server_options[*]}"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$out/machine.txt"

if [ "$quick" = 1 ]; then
    runs=1
    fanout_sizes="1000"
    connection_count=2000
    room_count=1000
else
    fanout_sizes="1000 5000 10000"
    # Leave descriptors for the listener, logs and the HTTP pool.
    connection_count=$(( open_files - 1500 ))
    [ "$connection_count" -gt 100000 ] && connection_count=100000
    room_count=10000
fi

# POST rates per fan-out size, in POSTs per second. Each POST reaches every
# client, so deliveries per second = rate x clients. Every rate runs, also
# past the p99 limit, so the reports show where throughput saturates.
fanout_rates() {
    case $1 in
        1000) echo "20,50,100,200,400" ;;
        5000) echo "5,10,20,40,80" ;;
        *) echo "2,5,10,20,40" ;;
    esac
}

wanted() {
    [[ $scenarios == *" $1 "* ]]
}

wanted fanout && echo "== scenario 1: fan-out"
wanted fanout && for clients in $fanout_sizes; do
    for run in $(seq 1 "$runs"); do
        start_server "$out/server-fanout-$clients-$run.log"
        client fanout --server "$server_addr" --server-pid "$server_pid" \
            --clients "$clients" --connect-rate 5000 --rates "$(fanout_rates "$clients")" \
            --step-seconds 5 --drain-seconds 3 --message-bytes 100 --p99-limit-ms 50 --keep-going \
            --time-limit 120 --json "$out/fanout-$clients-$run.json" | tee "$out/fanout-$clients-$run.txt"
        stop_server
    done
done

wanted connections && echo "== scenario 2: idle connections ($connection_count sockets)"
wanted connections && for run in $(seq 1 "$runs"); do
    start_server "$out/server-connections-$run.log"
    client connections --server "$server_addr" --server-pid "$server_pid" \
        --clients "$connection_count" --connect-rate 5000 --source-addresses 4 --hold-seconds 5 \
        --time-limit 120 --json "$out/connections-$run.json" | tee "$out/connections-$run.txt"
    stop_server
done

wanted rooms && echo "== scenario 3: room start ($room_count rooms)"
wanted rooms && for run in $(seq 1 "$runs"); do
    start_server "$out/server-rooms-$run.log" --max-rooms $(( room_count + 100 )) --room-idle-timeout 3600
    client rooms --server "$server_addr" --server-pid "$server_pid" \
        --rooms "$room_count" --concurrency 16 --prefix "run$run" \
        --time-limit 120 --json "$out/rooms-$run.json" | tee "$out/rooms-$run.txt"
    stop_server
done

wanted guest && echo "== guest calls (criterion, in process)"
wanted guest && "${pin_server[@]}" cargo bench -p partyhost-bench --bench guest_call 2>&1 | tee "$out/guest_call.txt"

echo "== summary (medians over $runs run(s))"
"$bench" summarize "$out" | tee "$out/summary.md"
echo "reports: $out"
