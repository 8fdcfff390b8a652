"""Test helper, run as root on a rehearsal node (`python3 - REQUESTS`): asks the monitors
(through librados) and local daemons' admin sockets, in one process, for what a test checks.
The `ceph` command takes about 50 s a call on the TCG VMs (it fetches and parses the
description of every monitor command first); one process asking several things takes seconds.

REQUESTS is a JSON list; each item is {"mon": COMMAND} (a monitor command, as `ceph` would send
it) or {"asok": PATH, "cmd": COMMAND} (a daemon's admin socket). Prints a JSON list with one
{"ret", "out", "err"} per request, `out` parsed when it is JSON."""

import json
import socket
import struct
import sys

import rados


def recv(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("the admin socket closed")
        data += chunk
    return data


def asok(path, cmd):
    # The admin socket protocol: the JSON command and a NUL; the answer's length as a
    # big-endian u32, then the answer.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(120)
        s.connect(path)
        s.sendall(json.dumps(cmd).encode() + b"\0")
        (n,) = struct.unpack(">I", recv(s, 4))
        return 0, recv(s, n), ""


def main():
    requests = json.loads(sys.argv[1])
    conf = {"client_mount_timeout": "60", "rados_mon_op_timeout": "120"}
    cluster = rados.Rados(conffile="/etc/ceph/ceph.conf", name="client.admin", conf=conf)
    cluster.connect()
    answers = []
    try:
        for r in requests:
            if "mon" in r:
                ret, out, err = cluster.mon_command(json.dumps(r["mon"]), b"")
            else:
                ret, out, err = asok(r["asok"], r["cmd"])
            try:
                out = json.loads(out)
            except ValueError:
                out = out.decode(errors="replace")
            answers.append({"ret": ret, "out": out, "err": err})
    finally:
        cluster.shutdown()
    print(json.dumps(answers))


main()
