#!/usr/bin/env bash
# Writes the Edgecase agent into a Raspberry Pi OS image file, offline: no root, no mount,
# no loop device (debugfs edits the ext4 root partition in place), so that the card flashed
# from it starts the agent on first boot.
#
#   cross/provision-image.sh IMAGE --config FILE [--binary FILE]
#
# IMAGE    a Raspberry Pi OS .img (xz -d it first): MBR, partition 1 FAT32 boot, 2 ext4 root
# --config the agent's configuration, written to /etc/edgecase/edgecase.toml (0640, group edgecase)
# --binary the static ARM build [default: target/cross/aarch64-unknown-linux-gnu/release/edgecase]
#
# Writes /usr/bin/edgecase, /etc/systemd/system/edgecase.service and edgecase-connector@.service,
# the enablement link in multi-user.target.wants, and the system user `edgecase` (a member of
# dialout) in /etc/passwd, group, shadow and gshadow, as the .deb's postinst would. Safe to
# run again. Reads everything back and runs e2fsck -fn before it says done.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
img=${1:-}; shift || true
config=""; binary=$here/target/cross/aarch64-unknown-linux-gnu/release/edgecase
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    *) echo "cross/provision-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "cross/provision-image.sh: $*" >&2; exit 1; }
[ -n "$img" ] && [ -f "$img" ] || die "usage: cross/provision-image.sh IMAGE --config FILE [--binary FILE]"
[ -n "$config" ] && [ -f "$config" ] || die "--config FILE is required"
[ -f "$binary" ] || die "no binary at $binary (build it: cross/build.sh aarch64)"
for tool in partx debugfs e2fsck; do
  command -v "$tool" >/dev/null || die "$tool is missing (Debian packages util-linux, e2fsprogs)"
done

# Partition 2 is the root file system (Raspberry Pi OS layout).
type2=$(partx -g -o TYPE -n 2 "$img" 2>/dev/null | tr -d ' ') || die "$img has no partition 2"
[ "$type2" = 0x83 ] || die "$img partition 2 is of type $type2, not Linux (0x83)"
root=$(( $(partx -g -o START -n 2 "$img" | tr -d ' ') * 512 ))
fs="$img?offset=$root"
dbg() { debugfs -R "$1" "$fs" 2>/dev/null; }
dbg "stat /etc/passwd" | grep -q "^Inode:" || die "no /etc/passwd on partition 2 of $img (not a Raspberry Pi OS image?)"

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# Mode, uid and gid of a file in the image, to keep them when it is rewritten.
owner() { dbg "stat $1" | sed -n 's/.*Mode: *\([0-9]*\).*/\1/p;' | head -1; }
ids() { dbg "stat $1" | sed -n 's/^User: *\([0-9]*\) *Group: *\([0-9]*\).*/\1 \2/p' | head -1; }

# The system user: an unused uid and gid from 100-999, as adduser --system picks.
for f in passwd group shadow gshadow; do dbg "dump -p /etc/$f $work/$f" || true; touch "$work/$f"; done
if ! grep -q '^edgecase:' "$work/passwd"; then
  used=$(cut -d: -f3 "$work/passwd"; cut -d: -f3 "$work/group")
  id=""
  for n in $(seq 999 -1 100); do grep -qx "$n" <<<"$used" || { id=$n; break; }; done
  [ -n "$id" ] || die "no free system uid in the image"
  echo "edgecase:x:$id:$id:Edgecase gateway agent:/var/lib/edgecase:/usr/sbin/nologin" >> "$work/passwd"
  echo "edgecase:!:$(( $(date +%s) / 86400 ))::::::" >> "$work/shadow"
fi
uid=$(awk -F: '$1=="edgecase"{print $3}' "$work/passwd")
grep -q '^edgecase:' "$work/group" || { echo "edgecase:x:$uid:" >> "$work/group"; echo "edgecase:!::" >> "$work/gshadow"; }
gid=$(awk -F: '$1=="edgecase"{print $3}' "$work/group")
# Serial ports: add edgecase to dialout (group and gshadow member lists).
for f in group gshadow; do
  awk -F: -v OFS=: '$1=="dialout" { n=split($NF, m, ","); has=0; for (i=1;i<=n;i++) if (m[i]=="edgecase") has=1;
      if (!has) $NF = ($NF=="" ? "edgecase" : $NF ",edgecase") } { print }' "$work/$f" > "$work/$f.new"
  mv "$work/$f.new" "$work/$f"
done
grep -q '^dialout:.*edgecase' "$work/group" || echo "cross/provision-image.sh: warning: the image has no dialout group; serial ports need one" >&2

cp "$binary" "$work/edgecase"
cp "$config" "$work/edgecase.toml"
cp "$here/systemd/edgecase.service" "$here/systemd/edgecase-connector@.service" "$work/"

exists() { dbg "stat $1" | grep -q "^Inode:"; }
# Room for the binary (debugfs would write part of it and carry on).
free=$(( $(dbg "stats" | sed -n 's/^Free blocks: *//p') * $(dbg "stats" | sed -n 's/^Block size: *//p') ))
[ "$free" -gt $(( $(stat -c %s "$binary") + 1048576 )) ] || die "the root partition has $free bytes free, too few for $binary"
# debugfs carries on (and exits 0) after a failed command: rm before write, and everything
# is checked by reading it back below.
{
  for f in passwd group shadow gshadow; do
    [ -s "$work/$f" ] || continue
    mode=$(owner "/etc/$f"); read -r fu fg <<<"$(ids "/etc/$f")"
    echo "rm /etc/$f"
    echo "write $work/$f /etc/$f"
    echo "sif /etc/$f mode 0100${mode#0}"; echo "sif /etc/$f uid ${fu:-0}"; echo "sif /etc/$f gid ${fg:-0}"
  done
  echo "rm /usr/bin/edgecase"
  echo "write $work/edgecase /usr/bin/edgecase"
  echo "sif /usr/bin/edgecase mode 0100755"
  exists /etc/edgecase || echo "mkdir /etc/edgecase"
  echo "sif /etc/edgecase mode 040750"; echo "sif /etc/edgecase gid $gid"
  echo "rm /etc/edgecase/edgecase.toml"
  echo "write $work/edgecase.toml /etc/edgecase/edgecase.toml"
  echo "sif /etc/edgecase/edgecase.toml mode 0100640"; echo "sif /etc/edgecase/edgecase.toml gid $gid"
  for u in edgecase.service edgecase-connector@.service; do
    echo "rm /etc/systemd/system/$u"
    echo "write $work/$u /etc/systemd/system/$u"
    echo "sif /etc/systemd/system/$u mode 0100644"
  done
  exists /etc/systemd/system/multi-user.target.wants || echo "mkdir /etc/systemd/system/multi-user.target.wants"
  echo "rm /etc/systemd/system/multi-user.target.wants/edgecase.service"
  echo "symlink /etc/systemd/system/multi-user.target.wants/edgecase.service /etc/systemd/system/edgecase.service"
} > "$work/inject.debugfs"
debugfs -w -f "$work/inject.debugfs" "$fs" >"$work/debugfs.log" 2>&1 || { cat "$work/debugfs.log" >&2; die "debugfs failed"; }

# Read back.
check() { # image-path local-file
  dbg "dump -p $1 $work/readback" && cmp -s "$work/readback" "$2" && return 0
  grep -iE "error|no space|fail" "$work/debugfs.log" | tail -5 >&2 || true
  die "$1 in the image differs from $2 (a full root partition? debugfs says above)"
}
check /usr/bin/edgecase "$work/edgecase"
check /etc/edgecase/edgecase.toml "$work/edgecase.toml"
check /etc/systemd/system/edgecase.service "$work/edgecase.service"
check "/etc/systemd/system/edgecase-connector@.service" "$work/edgecase-connector@.service"
check /etc/passwd "$work/passwd"
check /etc/group "$work/group"
dbg "stat /etc/systemd/system/multi-user.target.wants/edgecase.service" \
  | grep -q 'Fast link dest: "/etc/systemd/system/edgecase.service"' || die "the enablement link is missing"
e2fsck -fn "$fs" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log" >&2; die "e2fsck found problems on the root partition"; }
echo "cross/provision-image.sh: $img: /usr/bin/edgecase, /etc/edgecase/edgecase.toml, units, enabled in multi-user.target, user edgecase ($uid:$gid, dialout); read back, e2fsck clean"
