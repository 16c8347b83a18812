#!/usr/bin/env bash
# One container-engine scenario on one storage driver, run by tests/podman.rs.
# Usage: scenario.sh DIR DRIVER [rootless]
#   DIR: a fresh dir of the caller's (store, config, image root go there)
#   DRIVER: "native" (kernel overlay), or the path of a mount program
# Prints the trees the containers see, one section per step; the caller
# compares them across drivers. Cleans up its store on exit.
set -euo pipefail
dir=$1 driver=$2 mode=${3:-rootful}
source "$(dirname "$0")/setup.sh"


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
