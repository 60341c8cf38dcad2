#!/usr/bin/env bash
# CI for the gateway build: the static aarch64 binaries (size budget checked), the
# end-to-end tests with that binary under qemu-aarch64 against the real Mosquitto and
# RabbitMQ (kill -9 in the middle of a stream, SIGTERM, the systemd notify protocol), the
# .deb packages, and image provisioning on a synthetic image. (The units: systemd/ci.sh.)
# armv7 is built too when its standard library can be installed (see cross/README.md).
#
#   cross/ci.sh            (root; after scripts/services.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo; echo "=== cross/ci.sh: $* ($(( $(date +%s) - t0 ))s)"; }

step "aarch64 static build"
./cross/build.sh aarch64
bin=${CROSS_TARGET_DIR:-$PWD/target/cross}/aarch64-unknown-linux-gnu/release/edgecase

step "end-to-end tests with the aarch64 binary under qemu-aarch64-static"
# The test harness runs on the host; every agent it starts is the ARM build under qemu.
EDGECASE_BIN="qemu-aarch64-static $bin" cargo test -p edgecase --test e2e -- \
  crash::kill_dash_nine_loses_nothing crash::sigterm_stops_cleanly systemd:: mqtt::mqtt_readings_arrive_exactly_once

step ".deb packages"
./packaging/deb.sh arm64 "$bin"
./packaging/test-deb.sh dist/edgecase_*_arm64.deb
# The amd64 package is checked for what the package does (install, conffile kept on
# upgrade, user, units, purge), with the host's test build stripped: a second LTO build
# here would add ten minutes to CI and prove nothing more. `packaging/deb.sh amd64` alone
# builds the static release binary that ships.
host_bin=${CARGO_TARGET_DIR:-$PWD/target}/debug/edgecase
[ -x "$host_bin" ] || cargo build -p edgecase --no-default-features --bin edgecase
mkdir -p dist && strip -o "$PWD/dist/edgecase-amd64-ci" "$host_bin"
./packaging/deb.sh amd64 "$PWD/dist/edgecase-amd64-ci"
./packaging/test-deb.sh --install dist/edgecase_*_amd64.deb

step "Raspberry Pi OS image provisioning"
need=()
for t in sfdisk:fdisk mkfs.vfat:dosfstools mcopy:mtools; do command -v "${t%%:*}" >/dev/null || need+=("${t#*:}"); done
[ ${#need[@]} = 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
./cross/test-provision.sh "$bin"

step "armv7"
# Its standard library sometimes cannot be installed (a mirror mid-sync, cross/README.md):
# then armv7 is skipped. Once it is installed, a failed build, test or package fails CI.
if ./cross/build.sh --install-only armv7; then
  ./cross/build.sh armv7
  armbin=${CROSS_TARGET_DIR:-$PWD/target/cross}/armv7-unknown-linux-gnueabihf/release/edgecase
  EDGECASE_BIN="qemu-arm-static $armbin" cargo test -p edgecase --test e2e -- crash::kill_dash_nine_loses_nothing
  ./packaging/deb.sh armhf "$armbin"
  ./packaging/test-deb.sh dist/edgecase_*_armhf.deb
else
  echo "cross/ci.sh: armv7 skipped: its standard library cannot be installed from this mirror now (cross/README.md)"
fi
step "done"
