#!/usr/bin/env bash
# Installs (from Debian's packages) and starts the services the tests talk to: RabbitMQ and
# Mosquitto. Idempotent: a service already listening is left alone.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # port name
  for _ in $(seq 1 60); do listening "$1" && return 0; sleep 1; done
  echo "services: $2 is not listening on 127.0.0.1:$1 after 60 s" >&2; return 1
}
need_pkg() { # command package...
  command -v "$1" >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || { echo "services: $1 is missing; run as root to install ${*:2}" >&2; exit 1; }
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${@:2}" >/dev/null
}

need_pkg mosquitto mosquitto mosquitto-clients
if ! listening 1883; then
  echo "services: starting Mosquitto"
  mkdir -p /run/mosquitto /var/lib/mosquitto /var/log/mosquitto
  chown mosquitto: /run/mosquitto /var/lib/mosquitto /var/log/mosquitto 2>/dev/null || true
  if [ -f /etc/mosquitto/mosquitto.conf ]; then mosquitto -d -c /etc/mosquitto/mosquitto.conf
  else mosquitto -d -p 1883; fi
fi
wait_for 1883 Mosquitto

need_pkg rabbitmq-server rabbitmq-server
if ! listening 5672; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached
fi
wait_for 5672 RabbitMQ
# The port opens before the broker accepts logins; wait for the app itself.
rabbitmqctl await_startup >/dev/null 2>&1 || rabbitmqctl start_app >/dev/null
echo "services: Mosquitto 127.0.0.1:1883 and RabbitMQ 127.0.0.1:5672 are up"
"$(dirname "$0")/salesforce-clients.sh"
"$(dirname "$0")/streaming-clients.sh"
