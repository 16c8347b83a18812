# Sourced by the podman scripts: a store and configs of their own in $dir,
# for driver $driver ("native" or a mount program), and localhost/tiny, a
# busybox image (no registry is reachable). Also writes list.sh, which
# prints the tree a container sees.
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
