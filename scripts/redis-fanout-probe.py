# Does Redis answer a pipelined [SET, PUBLISH] only after writing the message to every subscriber?
# p50 of: SET alone, SET + PUBLISH pipelined, SET then PUBLISH (two round trips), with 0, 50, 200 and 800
# subscribers on the channel (raw sockets that never read: the kernel buffers what they are sent, so this
# process does none of their work). A one-off probe behind the README's fleet paragraph; the benchmark's
# own fleet rows (`make bench-redis`) measure the library. Usage, against a private server:
#   redis-server --port 40911 --save "" --maxclients 2000 &
#   taskset -a -cp 1 $(pgrep -f 'redis-server.*:40911'); ulimit -n 4096
#   taskset -c 0 python3 scripts/redis-fanout-probe.py 40911
import socket, subprocess, sys, time, statistics, os
port = int(sys.argv[1])
def conn():
    s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); return s
def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out
def read_replies(s, n, buf=[b""]):
    # simple: each reply here is one line (+OK or :N)
    got = 0
    while True:
        lines = buf[0].split(b"\r\n")
        if len(lines) - 1 >= n:
            buf[0] = b"\r\n".join(lines[n:]); return
        buf[0] += s.recv(65536)
subs = []
c = conn()


def measure(payload, iters=3000):
    ts = []
    for i in range(iters):
        t = time.perf_counter_ns()
        for p, n in payload:
            c.sendall(p); read_replies(c, n)
        ts.append(time.perf_counter_ns() - t)
    ts.sort(); return ts[len(ts)//2] / 1000
v = b"x" * 48; msg = b"m" * 61
set_ = cmd("SET", "k", v); pub = cmd("PUBLISH", "ch", msg)
for n in [0, 50, 200, 800]:
    while len(subs) < n:
        s = conn(); s.sendall(cmd("SUBSCRIBE", "ch")); subs.append(s)
    time.sleep(0.5)
    a = measure([(set_, 1)])
    b = measure([(set_ + pub, 2)])
    d = measure([(set_, 1), (pub, 1)])
    # drain subscriber sockets so their buffers don't fill
    for s in subs:
        s.setblocking(False)
        try:
            while s.recv(1 << 20): pass
        except BlockingIOError: pass
    print(f"subscribers {n:4d}: SET {a:7.1f} µs | SET+PUBLISH pipelined {b:7.1f} µs | SET then PUBLISH {d:7.1f} µs", flush=True)
