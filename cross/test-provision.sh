#!/usr/bin/env bash
# Tests cross/provision-image.sh on a synthetic image with Raspberry Pi OS's layout (MBR,
# FAT32 boot at sector 8192, ext4 root after it, with passwd/group/shadow, a dialout group
# and an existing multi-user.target.wants), built here without root or loop devices.
# Provisions it twice (the script must be rerunnable), then reads everything back from the
# image itself.
#
#   cross/test-provision.sh [BINARY]     (default: the aarch64 build, else a stand-in file)
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "cross/test-provision.sh: FAIL: $*" >&2; exit 1; }
for tool in sfdisk mkfs.vfat mkfs.ext4 debugfs mcopy mdir partx; do
  command -v "$tool" >/dev/null || fail "$tool is missing (Debian: fdisk dosfstools e2fsprogs mtools util-linux)"
done
binary=${1:-${CROSS_TARGET_DIR:-target/cross}/aarch64-unknown-linux-gnu/release/edgecase}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
if [ ! -f "$binary" ]; then
  binary=$work/edgecase-stand-in; head -c 3000000 /dev/urandom > "$binary"
fi

# The root file system's starting content.
rootdir=$work/rootdir
mkdir -p "$rootdir"/{etc/systemd/system/multi-user.target.wants,usr/bin,var/lib,boot/firmware}
printf 'root:x:0:0:root:/root:/bin/bash\npi:x:1000:1000:,,,:/home/pi:/bin/bash\nsystemd-network:x:998:998::/:/usr/sbin/nologin\n' > "$rootdir/etc/passwd"
printf 'root:x:0:\nshadow:x:42:\ndialout:x:20:pi\npi:x:1000:\nsystemd-network:x:998:\n' > "$rootdir/etc/group"
printf 'root:*:19000:0:99999:7:::\npi:!:19000:0:99999:7:::\nsystemd-network:!*:19000::::::\n' > "$rootdir/etc/shadow"
printf 'root:*::\nshadow:*::\ndialout:*::pi\npi:!::\nsystemd-network:!*::\n' > "$rootdir/etc/gshadow"
chmod 0640 "$rootdir/etc/shadow" "$rootdir/etc/gshadow"
chown 0:42 "$rootdir/etc/shadow" "$rootdir/etc/gshadow" 2>/dev/null || true
ln -s /lib/systemd/system/ssh.service "$rootdir/etc/systemd/system/multi-user.target.wants/ssh.service"

img=$work/raspios.img
truncate -s 160M "$img"
printf 'label: dos\nunit: sectors\n\nstart=8192, size=98304, type=c\nstart=106496, type=83\n' | sfdisk -q "$img"
mkfs.vfat -F 32 -n BOOTFS --offset 8192 "$img" 49152 >/dev/null 2>&1
boot=$(( 8192 * 512 )); root=$(( 106496 * 512 ))
echo "console=serial0,115200 root=PARTUUID=deadbeef-02 rootfstype=ext4" > "$work/cmdline.txt"
mcopy -i "$img@@$boot" "$work/cmdline.txt" ::cmdline.txt
mkfs.ext4 -q -F -L rootfs -b 4096 -E offset=$root -d "$rootdir" "$img" $(( (160 * 1024 * 1024 - root) / 4096 ))

cat > "$work/site.toml" <<'TOML'
[gateway]
id = "pi-site-7"
[amqp]
url = "amqps://gateway:secret@broker.example:5671/site7"
TOML
./cross/provision-image.sh "$img" --config "$work/site.toml" --binary "$binary" >/dev/null
./cross/provision-image.sh "$img" --config "$work/site.toml" --binary "$binary"

# Read back, independently of the script.
fs="$img?offset=$root"
dbg() { debugfs -R "$1" "$fs" 2>/dev/null; }
same() { dbg "dump -p $1 $work/out" && cmp -s "$work/out" "$2" || fail "$1 differs from $2"; }
same /usr/bin/edgecase "$binary"
same /etc/edgecase/edgecase.toml "$work/site.toml"
same /etc/systemd/system/edgecase.service systemd/edgecase.service
same "/etc/systemd/system/edgecase-connector@.service" "systemd/edgecase-connector@.service"
stat_of() { dbg "stat $1" | tr -s ' ' | grep -E '^(Inode|User)|Fast link' ; }
dbg "dump /etc/passwd $work/passwd"; dbg "dump /etc/group $work/group"; dbg "dump /etc/shadow $work/shadow"
[ "$(grep -c '^edgecase:' "$work/passwd")" = 1 ] || fail "passwd: $(cat "$work/passwd")"
uid=$(awk -F: '$1=="edgecase"{print $3}' "$work/passwd"); gid=$(awk -F: '$1=="edgecase"{print $4}' "$work/passwd")
[ "$uid" -ge 100 ] && [ "$uid" -le 999 ] && [ "$uid" != 998 ] || fail "uid $uid is not a free system uid"
grep -qx 'dialout:x:20:pi,edgecase' "$work/group" || fail "dialout: $(grep dialout "$work/group")"
[ "$(grep -c '^edgecase:' "$work/shadow")" = 1 ] || fail "shadow has no single edgecase entry"
grep -q '^pi:x:1000' "$work/passwd" || fail "the pi user was lost"
stat_of /usr/bin/edgecase | grep -q 'Mode: 0755' || fail "binary mode: $(stat_of /usr/bin/edgecase)"
stat_of /etc/edgecase/edgecase.toml | grep -q 'Mode: 0640' || fail "config mode"
stat_of /etc/edgecase/edgecase.toml | grep -q "User: 0 Group: $gid " || fail "config owner: $(stat_of /etc/edgecase/edgecase.toml)"
stat_of /etc/shadow | grep -q 'Mode: 0640' || fail "shadow mode changed: $(stat_of /etc/shadow)"
stat_of /etc/systemd/system/multi-user.target.wants/edgecase.service | grep -q 'Fast link dest: "/etc/systemd/system/edgecase.service"' \
  || fail "enablement link: $(stat_of /etc/systemd/system/multi-user.target.wants/edgecase.service)"
stat_of /etc/systemd/system/multi-user.target.wants/ssh.service | grep -q 'ssh.service' || fail "an existing link was lost"
e2fsck -fn "$fs" >/dev/null 2>&1 || fail "e2fsck: $(e2fsck -fn "$fs" 2>&1 | tail -5)"
mtype -i "$img@@$boot" ::cmdline.txt | grep -q 'rootfstype=ext4' || fail "the boot partition was damaged"
echo "cross/test-provision.sh: synthetic Raspberry Pi OS image provisioned twice and read back: binary ($(stat -c %s "$binary") bytes), config, both units, enablement link, user edgecase $uid:$gid in dialout, e2fsck clean, boot partition intact"
