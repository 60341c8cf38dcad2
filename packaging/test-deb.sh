#!/usr/bin/env bash
# Tests a .deb built by packaging/deb.sh:
#
#   packaging/test-deb.sh dist/edgecase_0.1.0-1_arm64.deb       # contents and metadata
#   packaging/test-deb.sh --install dist/edgecase_0.1.0-1_amd64.deb
#
# --install (root, this machine's architecture, no edgecase installed): installs it, checks the
# user, ownership, modes and the enablement link, edits the conffile, upgrades to a rebuilt
# revision 2 and checks the edit survived, then purges and removes the user again.
set -euo pipefail
cd "$(dirname "$0")/.."
install=0
if [ "${1:-}" = --install ]; then install=1; shift; fi
deb=${1:?usage: packaging/test-deb.sh [--install] PACKAGE.deb}
fail() { echo "packaging/test-deb.sh: $*" >&2; exit 1; }

info=$(dpkg-deb --info "$deb")
contents=$(dpkg-deb --contents "$deb")
arch=$(dpkg-deb --field "$deb" Architecture)
for path in ./usr/bin/edgecase ./lib/systemd/system/edgecase.service "./lib/systemd/system/edgecase-connector@.service" \
    ./etc/edgecase/edgecase.toml ./var/lib/edgecase/ ./usr/share/doc/edgecase/examples/gateway.toml; do
  grep -q " $path\$" <<<"$(awk '{print " "$6}' <<<"$contents")" || fail "$deb lacks $path"
done
grep -q '^-rwxr-xr-x root/root .* ./usr/bin/edgecase$' <<<"$contents" || fail "edgecase is not 0755 root:root"
[ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)" = /etc/edgecase/edgecase.toml ] || fail "conffiles is not /etc/edgecase/edgecase.toml"
for script in postinst prerm postrm; do grep -q " $script" <<<"$info" || fail "no $script"; done
echo "packaging/test-deb.sh: $deb: Architecture $arch, conffile /etc/edgecase/edgecase.toml, binary, units, docs, state directory"

[ "$install" = 1 ] || exit 0
[ "$(id -u)" = 0 ] || fail "--install needs root"
[ "$arch" = "$(dpkg --print-architecture)" ] || fail "--install needs a $(dpkg --print-architecture) package"
if dpkg-query -W edgecase >/dev/null 2>&1; then fail "edgecase is installed already; not touching it"; fi
had_user=0; getent passwd edgecase >/dev/null && had_user=1
cleanup() {
  dpkg --purge edgecase >/dev/null 2>&1 || true
  if [ "$had_user" = 0 ] && getent passwd edgecase >/dev/null; then userdel edgecase 2>/dev/null || true; fi
  getent group edgecase >/dev/null && [ "$had_user" = 0 ] && groupdel edgecase 2>/dev/null || true
  rm -rf /var/lib/edgecase /etc/systemd/system/multi-user.target.wants/edgecase.service
}
trap cleanup EXIT
dpkg -i "$deb" >/dev/null
id edgecase | grep -q '(dialout)' || fail "user edgecase is not in dialout: $(id edgecase)"
[ "$(stat -c '%U:%G %a' /etc/edgecase/edgecase.toml)" = "root:edgecase 640" ] || fail "config: $(stat -c '%U:%G %a' /etc/edgecase/edgecase.toml)"
[ "$(stat -c '%U:%G %a' /var/lib/edgecase)" = "edgecase:edgecase 750" ] || fail "state: $(stat -c '%U:%G %a' /var/lib/edgecase)"
[ "$(readlink /etc/systemd/system/multi-user.target.wants/edgecase.service)" = /lib/systemd/system/edgecase.service ] \
  || fail "edgecase.service is not enabled"
/usr/bin/edgecase check --config /etc/edgecase/edgecase.toml >/dev/null || fail "the example config does not check"
echo "packaging/test-deb.sh: installed: user edgecase (in dialout), /etc/edgecase/edgecase.toml root:edgecase 0640, /var/lib/edgecase edgecase 0750, enabled, config checks"

# Upgrade with a local edit: the edit stays.
echo '# local edit' >> /etc/edgecase/edgecase.toml
DEB_REVISION=2 ./packaging/deb.sh "$arch" /usr/bin/edgecase >/dev/null
v2=$(ls dist/edgecase_*-2_"$arch".deb)
dpkg -i --force-confold "$v2" >/dev/null
[ "$(dpkg-query -W -f='${Version}' edgecase)" = "$(dpkg-deb --field "$v2" Version)" ] || fail "upgrade did not happen"
grep -q '^# local edit$' /etc/edgecase/edgecase.toml || fail "the upgrade lost the edited conffile"
rm -f "$v2"
echo "packaging/test-deb.sh: upgraded to $(dpkg-query -W -f='${Version}' edgecase): the edited /etc/edgecase/edgecase.toml was kept"

dpkg --purge edgecase >/dev/null
[ ! -e /usr/bin/edgecase ] && [ ! -e /etc/edgecase/edgecase.toml ] || fail "purge left files"
echo "packaging/test-deb.sh: purged: binary and config gone"
