#!/usr/bin/env bash
# Measures the aarch64 agent under qemu-aarch64-static on this machine, against the local
# Mosquitto and RabbitMQ: edgecase-sim publishes at RATE readings/s (QoS 1) for SECONDS, and
# the agent's RSS (from /proc) and confirmed readings per second (from /metrics) are sampled
# every second. Prints one summary line. Emulation makes every figure a floor for a real Pi.
#
#   cross/qemu-figures.sh [RATE [SECONDS]]     (defaults 1000, 30)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}; seconds=${2:-30}
bin=${CROSS_TARGET_DIR:-$PWD/target/cross}/aarch64-unknown-linux-gnu/release/edgecase
sim=${SIM:-${CROSS_TARGET_DIR:-$PWD/target/cross}/aarch64-unknown-linux-gnu/release/edgecase-sim}
[ -x "$bin" ] && [ -x "$sim" ] || { echo "cross/qemu-figures.sh: build first: cross/build.sh aarch64" >&2; exit 1; }
./scripts/services.sh >/dev/null

tag=qemu-figures-$$
work=$(mktemp -d)
port=$(( 20000 + $$ % 20000 ))
cat > "$work/edgecase.toml" <<TOML
[gateway]
id = "$tag"
[log]
level = "warn"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "$tag"
topics = ["$tag/+/+"]
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
readings_exchange = "$tag.readings"
cases_exchange = "$tag.cases"
dead_letter_exchange = "$tag.dead"
unrouted_exchange = "$tag.unrouted"
unrouted_queue = "$tag.unrouted"
[admin]
listen = "127.0.0.1:$port"
TOML
qemu-aarch64-static "$bin" run --config "$work/edgecase.toml" --data-dir "$work/data" 2>"$work/agent.log" &
agent=$!
cleanup() {
  kill -TERM "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true
  rabbitmqctl -q delete_queue "$tag.unrouted" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
metric() { # name -> value from /metrics (0 if absent)
  { exec 3<>"/dev/tcp/127.0.0.1/$port" && printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3 && cat <&3; } 2>/dev/null \
    | awk -v n="$1" '$1==n {print $2; f=1} END {if (!f) print 0}'
}
for _ in $(seq 1 60); do [ "$(metric edgecase_amqp_connected)" = 1 ] && [ "$(metric edgecase_mqtt_connected)" = 1 ] && break; sleep 1; done
[ "$(metric edgecase_amqp_connected)" = 1 ] || { cat "$work/agent.log" >&2; echo "agent did not connect" >&2; exit 1; }
rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")

total=$(awk -v r="$rate" -v s="$seconds" 'BEGIN{printf "%d", r*s}')
qemu-aarch64-static "$sim" mqtt --prefix "$tag" --devices 10 --rate "$rate" --count "$total" >"$work/sim.log" 2>&1 &
simpid=$!
start=$(date +%s.%N); c0=$(metric edgecase_publish_confirmed_total)
peak=0; sum=0; n=0
for _ in $(seq 1 "$seconds"); do
  sleep 1
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")
  [ "$rss" -gt "$peak" ] && peak=$rss
  sum=$((sum + rss)); n=$((n + 1))
done
c1=$(metric edgecase_publish_confirmed_total); t1=$(date +%s.%N)
pending=$(metric edgecase_buffer_pending_readings)
wait "$simpid" || true
# Then let it drain: everything sent must come out.
for _ in $(seq 1 120); do
  c=$(metric edgecase_publish_confirmed_total)
  [ "$c" -ge "$total" ] && [ "$(metric edgecase_buffer_pending_readings)" = 0 ] && break; sleep 1
done
cend=$(metric edgecase_publish_confirmed_total); tend=$(date +%s.%N)
cpu=$(awk '{print $14+$15}' "/proc/$agent/stat"); hz=$(getconf CLK_TCK)
awk -v c0="$c0" -v c1="$c1" -v s="$start" -v t1="$t1" -v te="$tend" -v ce="$cend" -v total="$total" \
    -v idle="$rss_idle" -v peak="$peak" -v avg="$((sum / n))" -v pend="$pending" -v rate="$rate" -v cpu="$cpu" -v hz="$hz" 'BEGIN {
  printf "qemu-aarch64 at %d readings/s offered: %.0f readings/s confirmed during the load, backlog at its end %d; all %d delivered after %.1f s; RSS idle %.1f MiB, under load avg %.1f MiB, peak %.1f MiB; agent CPU %.0f s\n",
    rate, (c1 - c0) / (t1 - s), pend, ce, te - s, idle / 1024, avg / 1024, peak / 1024, cpu / hz
}'
