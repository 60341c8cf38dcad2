#!/usr/bin/env bash
# Installs (from Debian's packages) and starts the services the tests talk to: RabbitMQ,
# Mosquitto, PostgreSQL and MariaDB (the DB connector's tests), and the ODBC drivers of the
# connector's `odbc` build. Idempotent: a service already listening is left alone.
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

# PostgreSQL: user postgres without a password over 127.0.0.1 (trust), database test.
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_pkg postgresql-server-missing postgresql postgresql-client
if ! listening 5432; then
  echo "services: starting PostgreSQL"
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | head -n1 || true)
  if [ -n "$hba" ] && ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
    sed -i '/^[^#]/d' "$hba"
    printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' >> "$hba"
  fi
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  else
    service postgresql start
  fi
fi
wait_for 5432 PostgreSQL
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE test"

# MariaDB: root without a password over 127.0.0.1, database test.
need_pkg mariadbd mariadb-server mariadb-client
if ! listening 3306; then
  echo "services: starting MariaDB"
  mkdir -p /run/mysqld && chown mysql: /run/mysqld 2>/dev/null || true
  service mariadb start >/dev/null 2>&1 || (mysqld_safe >/dev/null 2>&1 &)
fi
wait_for 3306 MariaDB
if ! mariadb -uroot -h127.0.0.1 -e "SELECT 1" >/dev/null 2>&1; then
  # A fresh Debian install lets root in only through the socket: open it on 127.0.0.1.
  mariadb -uroot -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES"
fi
mariadb -uroot -h127.0.0.1 -e "CREATE DATABASE IF NOT EXISTS test"

# unixODBC and the SQLite and PostgreSQL ODBC drivers: the connector's `odbc` build.
for lib in /usr/include/sql.h /usr/lib/x86_64-linux-gnu/odbc/psqlodbcw.so /usr/lib/x86_64-linux-gnu/odbc/libsqlite3odbc.so; do
  [ -e "$lib" ] || { need_pkg odbc-drivers-missing unixodbc-dev odbc-postgresql libsqliteodbc; break; }
done

"$(dirname "$0")/salesforce-clients.sh"
"$(dirname "$0")/streaming-clients.sh"
echo "services: Mosquitto 1883, RabbitMQ 5672, PostgreSQL 5432 and MariaDB 3306 are up on 127.0.0.1"
