#!/bin/sh
# Builds the image tests' OCI layout in $1 (image "bb"): a busybox base and
# a second layer with a whiteout, an opaque directory, a hard link, a
# symlink and a setuid file, so that pulls and runs see each layer feature.
set -eu
out=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:bb"
umoci unpack --rootless --image "$out:bb" "$work/b" >/dev/null
r=$work/b/rootfs
mkdir -p "$r/bin" "$r/etc" "$r/opq" "$r/data" "$r/tmp"
cp /bin/busybox "$r/bin/busybox"
for c in sh ls cat echo id test stat readlink touch rm mkdir sleep grep wc head env pwd true false; do
    ln -s busybox "$r/bin/$c"
done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/data:/bin/sh\n' > "$r/etc/passwd"
printf 'root:x:0:\nstaff:x:1001:\ngroup7:x:7:\n' > "$r/etc/group"
echo base > "$r/etc/gone"
echo old > "$r/opq/old"
mkdir -p "$r/opaque" && echo old > "$r/opaque/old"
echo lower > "$r/data/lower"
umoci repack --refresh-bundle --image "$out:bb" "$work/b"
# Layer 2.
rm "$r/etc/gone"
rm -rf "$r/opq" && mkdir "$r/opq" && echo new > "$r/opq/new"
echo hello-from-image > "$r/etc/motd"
ln "$r/etc/motd" "$r/etc/motd.hard"
ln -s ../etc/motd "$r/data/motd-link"
cp /bin/busybox "$r/bin/suid" && chmod 4755 "$r/bin/suid"
umoci repack --refresh-bundle --image "$out:bb" "$work/b"
# Layer 3, by hand: umoci writes single whiteouts, never an opaque marker.
mkdir -p "$work/l3/opaque"
: > "$work/l3/opaque/.wh..wh..opq"
echo kept > "$work/l3/opaque/kept"
tar -C "$work/l3" --owner=0 --group=0 -cf "$work/l3.tar" opaque
umoci raw add-layer --image "$out:bb" "$work/l3.tar"
# A fixed creation time: `husk images` shows "2 years ago" and not "Less
# than a second ago", whose width would depend on how fast this ran.
umoci config --image "$out:bb" --created 2024-03-01T12:00:00Z \
    --config.cmd /bin/sh --config.cmd -c --config.cmd 'echo "hi from image $GREETING in $(pwd)"' \
    --config.env GREETING=hello --config.env PATH=/bin \
    --config.workingdir /data
