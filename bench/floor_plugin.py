"""The Python floor: an nbdkit Python plugin that only copies to and from a bytearray.

Used by the benchmarks as the fastest a Python plugin can serve a request here:
nbdcache's hits are compared with it.  ``size=BYTES`` sets the disk size (default
1 GiB); ``threads=parallel|serialize_requests`` the thread model.
"""

import nbdkit

API_VERSION = 2
_size = 1 << 30
_model = "parallel"
_disk = None


def config(key, value):
    global _size, _model
    if key == "size":
        _size = nbdkit.parse_size(value)
    elif key == "threads":
        _model = value
    else:
        raise RuntimeError(f"unknown parameter {key}")


def thread_model():
    return (nbdkit.THREAD_MODEL_PARALLEL if _model == "parallel"
            else nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS)


def get_ready():
    global _disk, _view
    _disk = bytearray(_size)
    _view = memoryview(_disk)


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = _view[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _view[offset:offset + len(buf)] = buf
