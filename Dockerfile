# nbdcache: the cached-disk server as a container image.
#
#   docker build -t nbdcache .
#   docker run -d --name nbdcache -v nbdcache-data:/var/lib/nbdcache \
#       -v nbdcache-run:/run/nbdcache nbdcache
#
# The image holds the Debian packages `make setup` installs (the Makefile's
# DEB_PACKAGES, less docker-compose, which only validates compose.yaml on the
# host; plus gnutls-bin for certtool, see docs/remote-backend.md), the project
# under /opt/nbdcache, and a virtualenv made from Debian's /usr/bin/python3
# with --system-site-packages so that nbdkit's embedded Python and the libnbd
# bindings (python3-libnbd) are the system ones.  The package is installed
# editable, as `make setup` does, so /opt/nbdcache is the source tree that
# nbdkit loads nbdcache/plugin.py from and vm-images/ sits beside it.  The same image runs the
# compose.yaml services nbd-backend (deploy/nbd-backend.sh) and vm
# (deploy/vm.sh).  See docs/deployment.md.
FROM debian:bookworm-slim

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Keep this list in step with DEB_PACKAGES in the Makefile
# (tests/deploy/test_deploy_files.py checks that it is a superset).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin qemu-system-x86 \
        qemu-utils fio python3-venv python3-yaml busybox-static e2fsprogs zstd cpio fuse3 \
        nbdfuse gnutls-bin \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nbdcache
COPY . /opt/nbdcache

RUN /usr/bin/python3 -m venv --system-site-packages /opt/nbdcache/.venv \
    && /opt/nbdcache/.venv/bin/pip install -e /opt/nbdcache \
    && /opt/nbdcache/.venv/bin/nbdcache check-config /opt/nbdcache/deploy/nbdcache.yaml \
    && install -d -m 0755 /etc/nbdcache /var/lib/nbdcache \
    && install -d -m 0700 /run/nbdcache \
    && install -m 0644 /opt/nbdcache/deploy/nbdcache.yaml /etc/nbdcache/nbdcache.yaml

ENV PATH=/opt/nbdcache/.venv/bin:$PATH

# The disk image (backend.path in deploy/nbdcache.yaml) and the export's socket.
VOLUME ["/var/lib/nbdcache", "/run/nbdcache"]

# SIGTERM (docker stop) makes `nbdcache serve` stop nbdkit, whose cleanup
# writes back every dirty block first: give it time (docker stop -t, or
# stop_grace_period in compose.yaml), see docs/deployment.md.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["nbdinfo", "--size", "nbd+unix:///?socket=/run/nbdcache/nbdcache.sock"]

ENTRYPOINT ["/opt/nbdcache/.venv/bin/nbdcache", "serve", "--config", "/etc/nbdcache/nbdcache.yaml"]
