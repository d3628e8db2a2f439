#!/bin/sh
# The nbd-backend service of compose.yaml: nbdkit serving one raw image over
# NBD on a TCP port, the upstream that nbdcache caches.
#
# Environment (defaults in brackets):
#   NBD_BACKEND_IMAGE  the image file [/var/lib/nbd-backend/disk.img]; created
#                      sparse at NBD_BACKEND_SIZE when missing
#   NBD_BACKEND_SIZE   size of a newly created image [8G]
#   NBD_BACKEND_PORT   TCP port to listen on [10809]
#   NBD_BACKEND_ADDR   address to listen on [every address of the container]
#
# nbdkit runs in the foreground as the container's main process; on SIGTERM it
# closes its connections and exits.  The file plugin syncs on NBD_CMD_FLUSH, so
# what nbdcache has flushed is on the volume.
set -eu

image=${NBD_BACKEND_IMAGE:-/var/lib/nbd-backend/disk.img}
size=${NBD_BACKEND_SIZE:-8G}
port=${NBD_BACKEND_PORT:-10809}
addr=${NBD_BACKEND_ADDR:-}

if [ ! -e "$image" ]; then
    mkdir -p "$(dirname "$image")"
    truncate -s "$size" "$image"
    echo "nbd-backend: created sparse $image ($size)" >&2
fi
echo "nbd-backend: serving $image on ${addr:-*}:$port" >&2
if [ -n "$addr" ]; then
    exec nbdkit --foreground --ipaddr "$addr" --port "$port" file "$image"
fi
exec nbdkit --foreground --port "$port" file "$image"
