#!/usr/bin/env bash
# The benchmark command: starts the services if needed (Mosquitto, RabbitMQ), then measures
# the raw ceilings and the agent's figures and prints them as one table with the goals.
# About two minutes after the build (the first, LTO build is slow on 2 cores). Run it on a
# quiet machine: concurrent builds or end-to-end tests share the CPUs and the brokers, and
# the run says so when it notices them.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
exec cargo bench -p edgecase --bench throughput "$@"
