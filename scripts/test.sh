#!/usr/bin/env bash
# The test command: starts the services if needed, then runs every test of the workspace
# (unit tests and the end-to-end tests against the real RabbitMQ and Mosquitto).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
cargo test --workspace --lib --bins --tests "$@"
