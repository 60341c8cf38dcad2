#!/usr/bin/env bash
# The agent's cost at a steady rate, the load a gateway normally sees: starts the gateway
# build of the agent against the local Mosquitto and RabbitMQ, sends it RATE readings a
# second (edgecase-sim mqtt) until COUNT were sent, and prints the agent's CPU time per
# thread (from /proc), how many buffer transactions (durable commits) it took and how many
# bytes it wrote to storage (flash wear on a gateway).
#
#   scripts/steady-load.sh [RATE] [COUNT] [AGENT_BINARY]    defaults: 1000 10000, the
#                                                          gateway build (built if needed)
#
# Compare two binaries by alternating runs: one run's figures move by about a tenth.
# Nothing consumes the readings: they go to exchanges of the run's own (left behind, empty)
# and end in its unrouted queue, which is deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
rate=${1:-1000}
count=${2:-10000}
./scripts/services.sh >/dev/null
target=${CARGO_TARGET_DIR:-$PWD/target}
if [ -n "${3:-}" ]; then
  agent=$3
else
  cargo build -q --release -p edgecase --no-default-features --bin edgecase --target-dir "$target/gateway"
  agent=$target/gateway/release/edgecase
fi
cargo build -q --release -p edgecase-sim
sim=$target/release/edgecase-sim

work=$(mktemp -d)
admin_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
prefix="steady$$"
cat >"$work/edgecase.toml" <<EOF
[gateway]
id = "steady-load"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "steady-load-$$"
topics = ["$prefix/+/+"]
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
readings_exchange = "$prefix.readings"
cases_exchange = "$prefix.cases"
dead_letter_exchange = "$prefix.dlx"
unrouted_exchange = "$prefix.unrouted"
unrouted_queue = "$prefix.unrouted"
[admin]
listen = "127.0.0.1:$admin_port"
[log]
level = "warn"
EOF
"$agent" run --config "$work/edgecase.toml" --data-dir "$work/data" >"$work/agent.log" 2>&1 &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rabbitmqctl -q delete_queue "$prefix.unrouted" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
metric() { curl -s "127.0.0.1:$admin_port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
for _ in $(seq 1 50); do [ "$(metric edgecase_mqtt_connected)" = 1 ] && break; sleep 0.2; done
[ "$(metric edgecase_mqtt_connected)" = 1 ] || { echo "agent did not connect; its log:" >&2; cat "$work/agent.log" >&2; exit 1; }

cpu() { for t in /proc/"$pid"/task/*; do echo "$(tr ' ' _ <"$t/comm") $(awk '{print $14, $15}' "$t/stat")"; done | sort; }
commits0=$(metric edgecase_buffer_commits_total)
written() { awk '$1 == "write_bytes:" {print $2}' /proc/"$pid"/io; }
written0=$(written)
cpu >"$work/before"
"$sim" mqtt --prefix "$prefix" --rate "$rate" --count "$count" -q >"$work/sim.log" 2>&1 || { cat "$work/sim.log" >&2; exit 1; }
for _ in $(seq 1 100); do [ "$(metric edgecase_buffer_pending_readings)" = 0 ] && break; sleep 0.1; done
cpu >"$work/after"
written1=$(written)
commits1=$(metric edgecase_buffer_commits_total)
hz=$(getconf CLK_TCK)
echo "$count readings at $rate/s through $agent"
paste "$work/before" "$work/after" | awk -v hz="$hz" -v n="$count" '
  { u[$1] += $5 - $2; s[$1] += $6 - $3 }
  END {
    for (k in u) { printf "  %-16s user %6.2f s  system %6.2f s\n", k, u[k] / hz, s[k] / hz; tu += u[k]; ts += s[k] }
    printf "  agent total      %.2f s of CPU, %.0f us per reading\n", (tu + ts) / hz, (tu + ts) / hz / n * 1e6
  }'
echo "  buffer transactions: $((commits1 - commits0)) ($(awk -v c=$((commits1 - commits0)) -v n="$count" 'BEGIN {printf "%.2f", c / n}') per reading)"
echo "  written to storage: $(awk -v b=$((written1 - written0)) -v n="$count" 'BEGIN {printf "%.1f MB, %.0f bytes per reading", b / 1e6, b / n}') (/proc/PID/io write_bytes: the WAL, and the database file at checkpoints)"
