#!/usr/bin/env bash
# The benchmark command: starts the services if needed (Mosquitto, RabbitMQ, PostgreSQL),
# then measures the raw ceilings and the agent's figures (the gateway build of the agent)
# and prints them as one table with the goals. `scripts/bench.sh db` runs the DB
# connector's benchmark instead (batched versus one transaction per message into PostgreSQL).
# About two minutes after the build (the first, LTO build is slow on 2 cores). Run it on a
# quiet machine: concurrent builds or end-to-end tests share the CPUs and the brokers, and
# the run says so when it notices them.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
if [ "${1:-}" = db ]; then
  shift
  exec cargo bench -p edgecase --bench db_connector "$@"
fi
# The agent as it ships on a gateway: the gateway build (no demo, no Avro), in a target
# directory of its own so that it and the bench's default build do not replace each other.
gateway_dir=${CARGO_TARGET_DIR:-$PWD/target}/gateway
cargo build --release -p edgecase --no-default-features --bin edgecase --target-dir "$gateway_dir"
export EDGECASE_BENCH_BIN="$gateway_dir/release/edgecase"
exec cargo bench -p edgecase --bench throughput "$@"
