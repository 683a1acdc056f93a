#!/usr/bin/env python3
"""Burst shape of every UDP leg (by port pair) in a pcap taken on lo, for
datagrams of 30 000 bytes and more: bursts are runs of datagrams less than
GAP apart (default 50 us). Used by bench/udp-loss.sh with CAPTURE=1.

    python3 bench/udp_bursts.py FILE.pcap [GAP_SECONDS]
"""
import struct, sys, collections
def legs(path):
    d = open(path, 'rb').read()
    magic = struct.unpack('<I', d[:4])[0]
    nano = magic == 0xa1b23c4d
    link = struct.unpack('<I', d[20:24])[0]
    off = 24; out = collections.defaultdict(list)
    while off + 16 <= len(d):
        ts, tf, incl, orig = struct.unpack('<IIII', d[off:off+16]); off += 16
        pkt = d[off:off+incl]; off += incl
        if orig < 30000: continue
        ip = pkt[14:] if link == 1 else pkt[16:] if link == 113 else pkt
        if ip[0] >> 4 != 4: continue
        ihl = (ip[0] & 15) * 4
        sport, dport = struct.unpack('>HH', ip[ihl:ihl+4])
        t = ts + tf / (1e9 if nano else 1e6)
        out[(sport, dport)].append(t)
    return out
GAP = float(sys.argv[2]) if len(sys.argv) > 2 else 50e-6
for (s, dp), ts in sorted(legs(sys.argv[1]).items(), key=lambda kv: kv[1][0]):
    if len(ts) < 100: continue
    bursts = []; n = 1
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    for g in gaps:
        if g < GAP: n += 1
        else: bursts.append(n); n = 1
    bursts.append(n)
    bursts.sort(); gaps.sort()
    q = lambda a, p: a[min(len(a)-1, int(p*len(a)))]
    # max datagrams in any 1 ms window
    j = 0; mx = 0
    for i in range(len(ts)):
        while ts[i] - ts[j] > 1e-3: j += 1
        mx = max(mx, i - j + 1)
    big = sum(b for b in bursts if b > 6)
    print(f"{s:>5}->{dp:<5} n={len(ts):6} bursts(gap<{GAP*1e6:.0f}us): n={len(bursts)} mean={len(ts)/len(bursts):.1f} p50={q(bursts,.5)} p90={q(bursts,.9)} p99={q(bursts,.99)} max={bursts[-1]}  dgrams in bursts>6: {100*big/len(ts):.1f}%  gap p10/p50/p90 us={q(gaps,.1)*1e6:.1f}/{q(gaps,.5)*1e6:.1f}/{q(gaps,.9)*1e6:.1f}  max/1ms={mx}")
