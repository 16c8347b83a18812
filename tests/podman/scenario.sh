#!/usr/bin/env bash
# One container-engine scenario on one storage driver, run by tests/podman.rs.
# Usage: scenario.sh DIR DRIVER [rootless]
#   DIR: a fresh dir of the caller's (store, config, image root go there)
#   DRIVER: "native" (kernel overlay), or the path of a mount program
# Prints the trees the containers see, one section per step; the caller
# compares them across drivers. Cleans up its store on exit.
set -euo pipefail
dir=$1 driver=$2 mode=${3:-rootful}
cd "$dir"
mkdir -p store run tmp rootfs
if [ "$driver" = native ]; then
    mount_program=""
else
    mount_program="mount_program = \"$driver\""
fi
cat > storage.conf <<CONF
[storage]
driver = "overlay"
graphroot = "$dir/store"
runroot = "$dir/run"
[storage.options.overlay]
$mount_program
CONF
cat > containers.conf <<CONF
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$dir/events.log"
tmp_dir = "$dir/tmp"
CONF
export CONTAINERS_STORAGE_CONF=$dir/storage.conf CONTAINERS_CONF=$dir/containers.conf
export TMPDIR=$dir/tmp XDG_RUNTIME_DIR=$dir/run
podman() { command podman --log-level=error "$@"; }
cleanup() {
    podman rm -af >/dev/null 2>&1 || true
    podman rmi -af >/dev/null 2>&1 || true
    command podman --log-level=error system reset -f >/dev/null 2>&1 || true
}
trap cleanup EXIT

# A tiny image from busybox: no registry is reachable.
r=rootfs
mkdir -p $r/bin $r/etc $r/usr/share/doc/pkg1 $r/usr/share/doc/pkg2 $r/opt/data $r/etc/skel/sub $r/tmp $r/home/u
cp /bin/busybox $r/bin/busybox
for a in sh ls rm mkdir mv echo cat find sort stat touch chmod chown ln id md5sum xargs sed; do
    ln -s busybox $r/bin/$a
done
printf 'root:x:0:0:root:/root:/bin/sh\nu:x:1001:1001::/home/u:/bin/sh\n' > $r/etc/passwd
printf 'root:x:0:\nu:x:1001:\n' > $r/etc/group
chmod 1777 $r/tmp
for f in a b c; do echo "doc $f" > $r/usr/share/doc/pkg1/$f; echo "doc2 $f" > $r/usr/share/doc/pkg2/$f; done
for f in f1 f2 f3; do echo "data $f" > $r/opt/data/$f; done
echo skel > $r/etc/skel/sub/s
# Owners as an image has them, whoever runs this.
tar -C $r --owner=0 --group=0 --exclude=./home/u -cf tiny.tar .
tar -C $r --owner=1001 --group=1001 -rf tiny.tar ./home/u
podman import -q tiny.tar localhost/tiny:latest >/dev/null

# What a container sees: names with type, owner and checksum, podman's own
# bind mounts left out.
cat > list.sh <<'LIST'
find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf \) -prune -o -print | sort | while read -r p; do
    if [ -L "$p" ]; then t="l $(ls -l "$p" | sed 's/.* -> //')"
    elif [ -d "$p" ]; then t=d
    elif [ -f "$p" ]; then t="f $(md5sum < "$p" | cut -c1-8)"
    else t=o; fi
    echo "$p $t $(stat -c %u:%g "$p")"
done
LIST
chmod 644 list.sh

cat > Containerfile <<'CF'
FROM localhost/tiny
RUN rm -rf /usr/share/doc/pkg1 && rm /opt/data/f1 && echo one > /one
RUN mv /opt/data /opt/moved && mkdir /opt/data && echo new > /opt/data/g && rm /opt/moved/f2
RUN rm -rf /etc/skel && mkdir /etc/skel && echo fresh > /etc/skel/y && rm /one
RUN echo hi > /hello && ln -s /hello /hl && mkdir -p /usr/share/doc/pkg1 && echo back > /usr/share/doc/pkg1/z
RUN rm -rf /usr/share/doc/pkg2/b /hl && chown 1001:1001 /hello && touch /usr/share/doc/pkg2/new
CF
podman build -q -t localhost/built:latest -f Containerfile --layers . >/dev/null
echo "== build"
podman run --rm -v "$dir/list.sh:/list.sh:ro" localhost/built sh /list.sh

podman run --name changer localhost/built sh -c \
    'rm /hello && echo changed > /opt/data/g && mkdir /newdir && echo z > /newdir/z && rm -rf /opt/moved && chown 1001 /newdir/z'
podman commit -q changer localhost/committed:latest >/dev/null
echo "== commit"
podman run --rm -v "$dir/list.sh:/list.sh:ro" localhost/committed sh /list.sh

echo "== uidmap"
if [ "$mode" = rootless ]; then
    podman run --rm --uidmap 0:1:65536 --gidmap 0:1:65536 -v "$dir/list.sh:/list.sh:ro" localhost/committed sh -c 'id; sh /list.sh'
    echo "== keep-id"
    podman run --rm --userns=keep-id -v "$dir/list.sh:/list.sh:ro" localhost/committed sh -c 'id -u; echo k > /tmp/k; cat /tmp/k; sh /list.sh'
else
    podman run --rm --uidmap 0:100000:65536 --gidmap 0:100000:65536 -v "$dir/list.sh:/list.sh:ro" localhost/committed sh -c 'id; echo w > /tmp/w; sh /list.sh'
fi
