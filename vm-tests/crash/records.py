#!/usr/bin/env python3
"""Checksummed records for the power-loss test (runs in the guest).

A record is RECORD_SIZE bytes: magic, sequence number (from 1), a payload derived
from the sequence number, and a CRC-32 over all of that. Record N lives at offset
(N - 1) * RECORD_SIZE, so a file holds records 1..K followed by at most a torn tail.

  records.py write FILE ACK_TTY STATE   append records forever; fsync each, and only
                                        then write "ack N" to ACK_TTY and N to STATE
  records.py check FILE N               records 1..N must all be there and intact;
                                        prints "valid=K bad=B" (K: intact prefix,
                                        B: records <= N missing or damaged)
  records.py sum FILE                   prints "K SHA256": intact prefix and the hash
                                        of the whole file
"""
import hashlib
import os
import struct
import sys
import zlib

MAGIC = b"SBR1"
RECORD_SIZE = 128
HEAD = struct.Struct("<4sQ")
PAYLOAD_SIZE = RECORD_SIZE - HEAD.size - 4


def payload(seq):
    seed = hashlib.sha256(b"snapblk-record-%d" % seq).digest()
    return (seed * (PAYLOAD_SIZE // len(seed) + 1))[:PAYLOAD_SIZE]


def record(seq):
    body = HEAD.pack(MAGIC, seq) + payload(seq)
    return body + struct.pack("<I", zlib.crc32(body))


def intact(buf, seq):
    return len(buf) == RECORD_SIZE and buf == record(seq)


def valid_prefix(data):
    n = 0
    while intact(data[n * RECORD_SIZE:(n + 1) * RECORD_SIZE], n + 1):
        n += 1
    return n


def read_all(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def cmd_check(path, expected):
    data = read_all(path)
    bad = sum(1 for seq in range(1, expected + 1)
              if not intact(data[(seq - 1) * RECORD_SIZE:seq * RECORD_SIZE], seq))
    print("valid=%d bad=%d" % (valid_prefix(data), bad))


def cmd_sum(path):
    data = read_all(path)
    print("%d %s" % (valid_prefix(data), hashlib.sha256(data).hexdigest()))


def cmd_write(path, ack_path, state_path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    # Continue after the intact prefix: a torn tail is a record never acknowledged.
    n = valid_prefix(os.pread(fd, os.fstat(fd).st_size, 0))
    os.ftruncate(fd, n * RECORD_SIZE)
    os.fsync(fd)
    ack = os.open(ack_path, os.O_WRONLY | os.O_NOCTTY)
    state = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    while True:
        n += 1
        rec = record(n)
        if os.pwrite(fd, rec, (n - 1) * RECORD_SIZE) != RECORD_SIZE:
            sys.exit("short write of record %d" % n)
        os.fsync(fd)
        # fsync returned: record n is durable; only now may the host learn of it.
        line = b"ack %d\n" % n
        if os.write(ack, line) != len(line):
            sys.exit("short write to %s" % ack_path)
        os.pwrite(state, b"%-20d\n" % n, 0)


def main():
    args = sys.argv[1:]
    if len(args) == 4 and args[0] == "write":
        cmd_write(args[1], args[2], args[3])
    elif len(args) == 3 and args[0] == "check" and args[2].isdigit():
        cmd_check(args[1], int(args[2]))
    elif len(args) == 2 and args[0] == "sum":
        cmd_sum(args[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
