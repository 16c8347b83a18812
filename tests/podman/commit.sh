#!/usr/bin/env bash
# rovl diff against podman commit, run by tests/podman.rs (rootful, kernel
# driver). Usage: commit.sh DIR ROVL
# A container changes files; rovl makes the layer of its upper dir, podman
# commits it. Prints both layers' listings, applies both with rovl apply
# (listing the trees), then loads an image whose top layer is rovl's and
# lists what its container sees next to what the committed image's sees.
set -euo pipefail
dir=$1 rovl=$2 driver=native mode=rootful
source "$(dirname "$0")/setup.sh"

podman run --name changer localhost/tiny sh -c '
    rm /opt/data/f1 && echo changed > /opt/data/f2 &&
    rm -rf /usr/share/doc/pkg1 && mkdir -p /usr/share/doc/pkg1 && echo z > /usr/share/doc/pkg1/new &&
    mkdir /newdir && echo n > /newdir/n && ln /newdir/n /newdir/hard && ln -s /newdir/n /sym &&
    chmod 700 /etc/skel && chown 1001:1001 /newdir/n && mv /home/u /home/moved && mkfifo /fifo'
upper=$(podman inspect changer --format '{{.GraphDriver.Data.UpperDir}}')
lower=$(podman inspect changer --format '{{.GraphDriver.Data.LowerDir}}')
"$rovl" diff --lower "$lower" "$upper" -o rovl.tar >/dev/null
podman commit -q changer localhost/committed:latest >/dev/null
podman save -q --format oci-dir -o oci localhost/committed:latest

# The committed image's top layer blob, by its manifest.
top=$(python3 - oci <<'PY'
import json, sys
d = sys.argv[1]
idx = json.load(open(f"{d}/index.json"))
m = idx["manifests"][0]["digest"].split(":")[1]
man = json.load(open(f"{d}/blobs/sha256/{m}"))
print(f'{d}/blobs/sha256/{man["layers"][-1]["digest"].split(":")[1]}')
PY
)

# Entries as "type mode owner size name -> link", sorted; dates left out.
listing() {
    tar --numeric-owner -tvf "$1" | awk '{ $4 = ""; $5 = ""; print }' | sort -k4
}
echo "== podman layer"
listing "$top"
echo "== rovl layer"
listing rovl.tar

tree() {
    (cd "$1" && find . | sort | while read -r p; do
        if [ -L "$p" ]; then t="l $(readlink "$p")"
        elif [ -f "$p" ]; then t="f $(md5sum < "$p" | cut -c1-8)"
        else t=$(stat -c %F "$p"); fi
        echo "$p $t $(stat -c '%a %u:%g %t:%T %h' "$p")"
    done)
}
"$rovl" apply "$top" applied-podman >/dev/null
"$rovl" apply rovl.tar applied-rovl >/dev/null
echo "== podman applied"
tree applied-podman
echo "== rovl applied"
tree applied-rovl

# An image whose top layer is rovl's: the blob, manifest, config and index
# rewritten, packed as an OCI archive for podman load.
python3 - oci rovl.tar <<'PY'
import hashlib, json, os, shutil, sys
d, layer = sys.argv[1], sys.argv[2]
def put(data):
    h = hashlib.sha256(data).hexdigest()
    open(f"{d}/blobs/sha256/{h}", "wb").write(data)
    return f"sha256:{h}", len(data)
idx = json.load(open(f"{d}/index.json"))
m = idx["manifests"][0]
man = json.load(open(f"{d}/blobs/sha256/{m['digest'].split(':')[1]}"))
data = open(layer, "rb").read()
digest, size = put(data)
man["layers"][-1].update(digest=digest, size=size,
                         mediaType="application/vnd.oci.image.layer.v1.tar")
cfg = json.load(open(f"{d}/blobs/sha256/{man['config']['digest'].split(':')[1]}"))
cfg["rootfs"]["diff_ids"][-1] = digest
man["config"]["digest"], man["config"]["size"] = put(json.dumps(cfg).encode())
m["digest"], m["size"] = put(json.dumps(man).encode())
m["annotations"] = {"org.opencontainers.image.ref.name": "localhost/fromrovl:latest"}
json.dump(idx, open(f"{d}/index.json", "w"))
PY
tar -C oci -cf fromrovl.tar .
podman load -q -i fromrovl.tar >/dev/null
podman image exists localhost/fromrovl:latest
echo "== committed image"
podman run --rm -v "$dir/list.sh:/list.sh:ro" localhost/committed sh /list.sh
echo "== rovl image"
podman run --rm -v "$dir/list.sh:/list.sh:ro" localhost/fromrovl sh /list.sh
