#!/usr/bin/env python3
"""Writes the hand-built seed inputs under seeds/<target>/ (run.sh copies them
into corpus/<target>/ before fuzzing). Each is a valid conversation the
fuzzer would take long to find alone: a vsock stream to the listening port,
a driver bring-up through the mmio registers, FUSE sessions that open, read,
write, list, rename and remove, and reach the inode and handle limits, and
virtio-net rings with frames both ways, short, writable and looping chains.

    python3 vmm/fuzz/seeds/gen.py     (rewrites the files; they are committed)
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- vsock_packet
# Input: [tx queue size, rx queue size, rounds, payload / 64, guest memory]; the
# memory is region A [0, 4 KiB) then region B [8 KiB, 12 KiB) (common.rs).
# queue_size(b) = 1 << (b % 7) for b % 7 < 5; 4 -> 16 entries.
TXQ = (0x000, 0x100, 0x200)
RXQ = (0x300, 0x400, 0x500)
NEXT, WRITE_F = 1, 2
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7


class Image:
    def __init__(self, size=0x1000 + 0x1000):
        self.b = bytearray(size)

    def put(self, addr, data):
        # Guest address -> image offset (region B follows region A in the image).
        off = addr if addr < 0x1000 else addr - 0x2000 + 0x1000
        self.b[off:off + len(data)] = data

    def desc(self, table, i, addr, length, flags, nxt):
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def avail(self, ring, heads):
        self.put(ring, struct.pack("<HH", 0, len(heads)))
        for i, h in enumerate(heads):
            self.put(ring + 4 + 2 * i, struct.pack("<H", h))


def vsock_hdr(op, src_port=5000, dst_port=1024, length=0, flags=0, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, flags, buf_alloc, fwd_cnt)


def vsock_image(packets, split_first=False):
    img = Image()
    heads, d, data_at = [], 0, 0x900
    for hdr, payload in packets:
        heads.append(d)
        if split_first and d == 0:
            # The header over two buffers.
            img.put(data_at, hdr)
            img.desc(TXQ[0], d, data_at, 20, NEXT, d + 1)
            img.desc(TXQ[0], d + 1, data_at + 20, len(hdr) - 20, NEXT if payload else 0, d + 2)
            d += 2
        else:
            img.put(data_at, hdr)
            img.desc(TXQ[0], d, data_at, len(hdr), NEXT if payload else 0, d + 1)
            d += 1
        data_at += 0x40
        if payload:
            img.put(0x2000 + (data_at - 0x900), payload)
            img.desc(TXQ[0], d, 0x2000 + (data_at - 0x900), len(payload), 0, 0)
            d += 1
            data_at += 0x40
    img.avail(TXQ[1], heads)
    # Four writable RX buffers for the device's replies.
    for i in range(4):
        img.desc(RXQ[0], i, 0x2800 + 0x100 * i, 0x100, WRITE_F, 0)
    img.avail(RXQ[1], list(range(4)))
    return bytes(img.b)


def vsock_seeds():
    stream = [
        (vsock_hdr(OP_REQUEST), b""),
        (vsock_hdr(OP_RW, length=5), b"hello"),
        (vsock_hdr(OP_CREDIT_REQUEST), b""),
        (vsock_hdr(OP_CREDIT_UPDATE, buf_alloc=4096, fwd_cnt=5), b""),
        (vsock_hdr(OP_SHUTDOWN, flags=3), b""),
        (vsock_hdr(OP_RST), b""),
    ]
    write("vsock_packet", "stream_to_listener", bytes([4, 4, 3, 1]) + vsock_image(stream))
    write("vsock_packet", "header_split", bytes([4, 4, 2, 0]) + vsock_image(stream[:2], split_first=True))
    nobody = [(vsock_hdr(OP_REQUEST, dst_port=7), b""), (vsock_hdr(OP_RW, dst_port=7, length=3), b"abc")]
    write("vsock_packet", "no_listener", bytes([4, 4, 1, 0]) + vsock_image(nobody))
    # RW past the credit the guest was given, then a second REQUEST on the same port.
    over = [(vsock_hdr(OP_REQUEST), b""), (vsock_hdr(OP_RW, length=64), b"x" * 64), (vsock_hdr(OP_REQUEST), b"")]
    write("vsock_packet", "overrun_and_rerequest", bytes([4, 4, 4, 2]) + vsock_image(over))
    return stream


# -------------------------------------------------------------- mmio_registers
# The target's input is `Input { vsock: bool, ops: Vec<Op>, memory: Vec<u8> }`
# decoded by arbitrary 1.x's take_rest: a bool byte, then each op behind a 0x01
# "more" byte and a 0x00 after the last, then each memory byte behind a 0x01.
# An enum's variant is (u32 le * variants) >> 32.
def tag(k, n=5):
    return struct.pack("<I", -(-(k << 32) // n))


def op_read(offset, size):
    return b"\x01" + tag(0) + struct.pack("<HB", offset, size)


def op_write(offset, size, value):
    return b"\x01" + tag(1) + struct.pack("<HBQ", offset, size, value)


def op_notify(q):
    return b"\x01" + tag(2) + struct.pack("<B", q)


def op_poke(addr, data8):
    return b"\x01" + tag(3) + struct.pack("<H", addr) + data8


def op_init(sizes, addrs, features_ok=True):
    b = b"\x01" + tag(4) + bytes(sizes)
    for a in addrs:
        b += struct.pack("<HHH", *a)
    return b + bytes([1 if features_ok else 0])


def mmio_input(vsock, ops, memory):
    mem = b"".join(b"\x01" + bytes([x]) for x in memory.rstrip(b"\0"))
    return bytes([1 if vsock else 0]) + b"".join(ops) + b"\x00" + mem


def mmio_seeds(stream):
    # vsock: queue 0 RX, 1 TX, 2 events; size byte 4 -> 16 entries.
    memory = vsock_image(stream)[:0x1000]
    ops = [
        op_init([4, 4, 4], [RXQ, TXQ, (0x600, 0x700, 0x800)]),
        op_notify(1),
        op_notify(0),
        op_read(0x60, 4),
        op_write(0x64, 4, 1),
        op_read(0x70, 4),
        op_read(0x100, 8),
        op_notify(1),
    ]
    write("mmio_registers", "vsock_bring_up", mmio_input(True, ops, memory))
    # rng: one writable buffer on queue 0.
    img = Image()
    img.desc(0x000, 0, 0x900, 64, WRITE_F, 0)
    img.avail(0x100, [0])
    ops = [op_init([4, 0, 0], [TXQ, (0, 0, 0), (0, 0, 0)]), op_notify(0), op_read(0x60, 4), op_write(0x64, 4, 1)]
    write("mmio_registers", "rng_bring_up", mmio_input(False, ops, bytes(img.b[:0x1000])))
    # Every register read at every width, then a reset and a second bring-up
    # with the ring rewritten in between.
    ops = [op_read(off, w) for off in range(0, 0x104, 4) for w in (4,)] + [op_read(0x70, 1), op_read(0x70, 2), op_read(0x70, 8)]
    ops += [op_write(0x70, 4, 0), op_poke(0x100, struct.pack("<HHHH", 0, 1, 0, 0))]
    ops += [op_init([4, 4, 4], [RXQ, TXQ, (0x600, 0x700, 0x800)], features_ok=False), op_notify(1)]
    write("mmio_registers", "register_sweep", mmio_input(True, ops[:200], memory))


# ------------------------------------------------------------------- virtio_fs
# Setup byte, then records: opcode, queue, nodeid, fh, uid, len_delta, reply_len
# (le16), split, pad, body_len (le16), body (see fuzz_targets/virtio_fs.rs).
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR = 1, 2, 3, 4, 5, 6, 8, 9
UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 10, 11, 12, 13, 14, 15, 16, 17, 18
FLUSH, OPENDIR, READDIR, RELEASEDIR, CREATE, BATCH_FORGET = 25, 27, 28, 29, 35, 42
FALLOCATE, READDIRPLUS, LSEEK = 43, 44, 46


def rec(opcode, nodeid=1, body=b"", fh=0, queue=1, reply=0x1000, split=0, uid=0, len_delta=0):
    return struct.pack("<BBBBBbHBBH", opcode, queue, nodeid, fh, uid, len_delta, reply, split, 0, len(body)) + body


def z(s):
    return s.encode() + b"\0"


def read_in(fh, size=4096, offset=0):
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


def fs_seeds():
    O_RDWR, O_CREAT, O_DIRECTORY = 2, 0o100, 0o200000
    # Fresh device per input: root 1, then node ids 2, 3... in lookup order;
    # handles 1, 2...
    session = [
        rec(LOOKUP, 1, z("file")),  # node 2
        rec(GETATTR, 2, struct.pack("<IIQ", 0, 0, 0)),
        rec(OPEN, 2, struct.pack("<II", O_RDWR, 0)),  # fh 1
        rec(READ, 2, read_in(1), fh=1, split=0b0101),
        rec(WRITE, 2, struct.pack("<QQIIQII", 1, 3, 3, 0, 0, 0, 0) + b"abc", fh=1, split=0b0010),
        rec(FLUSH, 2, struct.pack("<QIIQ", 1, 0, 0, 0), fh=1),
        rec(LSEEK, 2, struct.pack("<QQII", 1, 0, 3, 0), fh=1),
        rec(RELEASE, 2, struct.pack("<QIIQ", 1, 0, 0, 0), fh=1),
        rec(FORGET, 2, struct.pack("<Q", 1), queue=0, reply=0),
        rec(STATFS, 1),
    ]
    write("virtio_fs", "open_read_write", b"\x00" + b"".join(session))
    tree = [
        rec(MKDIR, 1, struct.pack("<II", 0o755, 0) + z("d")),  # node 2
        rec(CREATE, 1, struct.pack("<IIII", O_RDWR | O_CREAT, 0o100644, 0o022, 0) + z("new")),  # node 3, fh 1
        rec(OPENDIR, 1, struct.pack("<II", O_DIRECTORY, 0)),  # fh 2
        rec(READDIRPLUS, 1, read_in(2), fh=2, reply=0x2000),
        rec(READDIR, 1, read_in(2), fh=2),
        rec(RELEASEDIR, 1, struct.pack("<QIIQ", 2, 0, 0, 0), fh=2),
        rec(SYMLINK, 1, z("/etc/passwd") + z("lnk")),
        rec(LOOKUP, 1, z("lnk")),
        rec(READLINK, 4),
        rec(LINK, 1, struct.pack("<Q", 3) + z("hard")),
        rec(RENAME, 1, struct.pack("<Q", 2) + z("new") + z("renamed")),
        rec(UNLINK, 2, z("renamed")),
        rec(UNLINK, 1, z("hard")),
        rec(RMDIR, 1, z("d")),
        rec(MKNOD, 1, struct.pack("<IIII", 0o010644, 0, 0, 0) + z("pipe")),
        rec(MKNOD, 1, struct.pack("<IIII", 0o020644, 0, 0, 0) + z("whiteout")),
        rec(SETATTR, 1, struct.pack("<IIQQQQQQIIIIIIII", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o40777, 0, 0, 0, 0)),
        rec(SETATTR, 3, struct.pack("<IIQQQQQQIIIIIIII", 8 | 64, 0, 1, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), fh=1),
        rec(FALLOCATE, 3, struct.pack("<QQQII", 1, 0, 4096, 0, 0), fh=1),
        rec(BATCH_FORGET, 0, struct.pack("<II", 2, 0) + struct.pack("<QQ", 2, 1) + struct.pack("<QQ", 3, 1), queue=0, reply=0),
    ]
    write("virtio_fs", "make_list_rename_remove", b"\x02" + b"".join(tree))
    # Up to and past the limits (12 inodes, 6 handles), then back.
    limits = [rec(MKNOD, 1, struct.pack("<IIII", 0o100644, 0, 0, 0) + z("n%d" % i)) for i in range(14)]
    limits += [rec(OPEN, 2, struct.pack("<II", 0, 0)) for _ in range(8)]
    limits += [rec(RELEASE, 2, struct.pack("<QIIQ", 1, 0, 0, 0), fh=1)]
    limits += [rec(FORGET, 2, struct.pack("<Q", 1), queue=0, reply=0), rec(LOOKUP, 1, z("file"))]
    write("virtio_fs", "past_the_limits", b"\x04" + b"".join(limits))
    # All of it in one input, with a DESTROY between (node ids then mismatch,
    # which is fine): long inputs from the start, so libFuzzer's length limit
    # begins near the 64 requests an input may carry.
    destroy = [rec(38, 0, b"", reply=0x100)]
    write("virtio_fs", "all_in_one", b"\x00" + b"".join(session + destroy + tree + destroy + limits))
    # Malformed chains and lying lengths (each puts the device into NEEDS_RESET
    # or gets an error reply; the harness resets and starts again).
    bad = []
    for kind in range(10, 16):
        bad.append(rec(LOOKUP, 1, z("file"), split=kind << 4))
    for delta in (-40, -1, 1, 100):
        bad.append(rec(LOOKUP, 1, z("file"), len_delta=delta))
    bad.append(rec(LOOKUP, 1, z("file"), reply=8))
    bad.append(rec(LOOKUP, 1, z("file"), reply=0))
    bad.append(rec(LOOKUP, 1, z("../etc")))
    bad.append(rec(LOOKUP, 1, b"file"))  # no NUL
    write("virtio_fs", "malformed", b"\x00" + b"".join(bad))


# ------------------------------------------------------------------ virtio_net
# Input: [tx queue size, rx queue size, rounds, frames for the guest,
# frame length / 8 (after the 12-byte header), limits, guest memory].
def net_image(tx_chains, rx_bufs):
    """tx_chains: lists of (addr, length, readable?); rx_bufs: (addr, length)."""
    img = Image()
    heads, d = [], 0
    for chain in tx_chains:
        heads.append(d)
        for i, (addr, length, readable) in enumerate(chain):
            last = i == len(chain) - 1
            flags = (0 if last else NEXT) | (0 if readable else WRITE_F)
            img.desc(TXQ[0], d, addr, length, flags, 0 if last else d + 1)
            img.put(addr, bytes([0]) * 12 + bytes(i % 256 for i in range(length - 12)) if length > 12 else bytes(length))
            d += 1
    img.avail(TXQ[1], heads)
    for i, (addr, length) in enumerate(rx_bufs):
        img.desc(RXQ[0], i, addr, length, WRITE_F, 0)
    img.avail(RXQ[1], list(range(len(rx_bufs))))
    return bytes(img.b)


def net_seeds():
    tx = [[(0x900, 12, True), (0x920, 60, True)], [(0xa00, 74, True)], [(0xb00, 1514 + 12 - 1024, True)]]
    rx = [(0x2000, 0x200), (0x2200, 0x200), (0x2400, 0x400)]
    write("virtio_net", "tx_and_rx", bytes([4, 4, 2, 3, 40, 0]) + net_image(tx, rx))
    write("virtio_net", "rx_frames_too_big", bytes([4, 4, 1, 4, 64, 0]) + net_image(tx[:1], rx[:2]))
    write("virtio_net", "limited", bytes([4, 4, 3, 5, 40, 3]) + net_image(tx, rx))
    short = [[(0x900, 12, True)], [(0x920, 20, True)], [(0x940, 12, True), (0x960, 40, False)]]
    write("virtio_net", "short_and_writable_tx", bytes([4, 4, 1, 1, 8, 0]) + net_image(short, rx[:1]))
    # A TX chain that loops, and an RX buffer the device may only read.
    img = Image()
    img.desc(TXQ[0], 0, 0x900, 12, NEXT, 1)
    img.desc(TXQ[0], 1, 0x920, 60, NEXT, 0)
    img.avail(TXQ[1], [0])
    img.desc(RXQ[0], 0, 0x2000, 0x200, 0, 0)
    img.avail(RXQ[1], [0])
    write("virtio_net", "malformed", bytes([4, 4, 1, 2, 8, 0]) + bytes(img.b))


if __name__ == "__main__":
    s = vsock_seeds()
    mmio_seeds(s)
    fs_seeds()
    net_seeds()
