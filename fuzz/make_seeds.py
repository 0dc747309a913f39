#!/usr/bin/env python3
"""Write the seed corpus of the decode_msg fuzz target: real-shaped uffd_msg sequences.

Each file is 8 bytes of negotiated features (little-endian u64) followed by 32-byte messages
(event byte, 7 reserved bytes, then the 24-byte union), laid out as on x86_64 (little-endian).
Run from the fuzz/ directory: python3 make_seeds.py
"""
import os
import struct

PAGEFAULT, FORK, REMAP, REMOVE, UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16
THREAD_ID = 1 << 8
EVENT_REMOVE = 1 << 3
FLAG_WRITE, FLAG_WP, FLAG_MINOR = 1, 2, 4
BASE = 0x7F12_3456_0000


def msg(event, *words, tid=None):
    body = struct.pack("<3Q", *(list(words) + [0] * (3 - len(words))))
    if tid is not None:  # ptid is the u32 after flags and address
        body = body[:16] + struct.pack("<I", tid) + body[20:]
    return bytes([event]) + bytes(7) + body


def seed(name, features, *messages):
    data = struct.pack("<Q", features) + b"".join(messages)
    with open(os.path.join("corpus", "decode_msg", "seed-" + name), "wb") as f:
        f.write(data)


os.makedirs(os.path.join("corpus", "decode_msg"), exist_ok=True)
seed("pagefault-read", 0, msg(PAGEFAULT, 0, BASE))
seed("pagefault-write-tid", THREAD_ID, msg(PAGEFAULT, FLAG_WRITE, BASE + 0x3000, tid=4242))
seed("pagefault-wp-minor", THREAD_ID, msg(PAGEFAULT, FLAG_WP | FLAG_MINOR | FLAG_WRITE, BASE, tid=7))
seed("fork", 1 << 1, msg(FORK, 7))
seed("remap", 1 << 2, msg(REMAP, BASE, BASE + (1 << 30), 0x20_0000))
seed("remove", EVENT_REMOVE, msg(REMOVE, BASE, BASE + 0x10_0000))
seed("unmap", 1 << 6, msg(UNMAP, BASE, BASE + 0x1000))
seed("remove-inverted", EVENT_REMOVE, msg(REMOVE, BASE + 0x2000, BASE))
seed("unknown-event", 0, msg(0x99, 1, 2, 3))
# A Firecracker-like burst: faults from several vCPU threads, a balloon REMOVE, more faults.
seed(
    "burst",
    EVENT_REMOVE | THREAD_ID,
    msg(PAGEFAULT, 0, BASE + 0x1000, tid=101),
    msg(PAGEFAULT, FLAG_WRITE, BASE + 0x1000, tid=102),
    msg(REMOVE, BASE + 0x40_0000, BASE + 0x80_0000),
    msg(PAGEFAULT, FLAG_WRITE, BASE + 0x40_0000, tid=101),
)
