#!/usr/bin/env python3
# nbd_place.py SRVPID FIOPID SECONDS (bench/nbd_ab.sh): fraction of samples where the busiest server thread and fio's job thread were on the same CPU
import os, sys, time
srv, fiop, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def tasks(pid):
    try: return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError: return []
def stat(pid, tid):
    try:
        f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[36]), int(f[11]) + int(f[12])   # processor (field 39), utime+stime
    except OSError: return None
# fio job: child process of fio
def comm_ppid(p):
    t = open(f"/proc/{p}/stat").read()
    return t[t.index("(")+1:t.rindex(")")], int(t.rsplit(")",1)[1].split()[1])
kids = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            c, pp = comm_ppid(p)
            if c == "fio" and comm_ppid(pp)[0] == "fio": kids.append(int(p))
        except Exception: pass
fj = kids[0] if kids else fiop
samples = []
end = time.time() + secs
st0 = {t: stat(srv, t) for t in tasks(srv)}
while time.time() < end:
    s = {t: stat(srv, t) for t in tasks(srv)}
    f = stat(fj, fj)
    if f: samples.append((s, f[0]))
    time.sleep(0.005)
st1 = {t: stat(srv, t) for t in tasks(srv)}
busy = max(st1, key=lambda t: (st1[t][1] - st0[t][1]) if st1.get(t) and st0.get(t) else -1)
same = sum(1 for s, c in samples if s.get(busy) and s[busy][0] == c)
print("%.2f" % (same / max(1, len(samples))))
