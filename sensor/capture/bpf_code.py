"""Classic BPF instructions, for the filter programs a ``read`` builds in Python and hands to
libpcap between batches (capture.shunt's flow tests, capture.dns_screen's DNS stage): one
``struct bpf_insn`` layout and the opcodes they use, from linux/filter.h."""

from __future__ import annotations

import struct

INSN = struct.Struct("=HBBI")  # code, jt, jf, k: as libpcap and the kernel read a program

LD_LEN, LD_IND, LDH_IND, LDB_IND, LDH_ABS, LDB_ABS = 0x80, 0x40, 0x48, 0x50, 0x28, 0x30
LDX_IMM, LDX_MEM, STX, TAX, TXA = 0x01, 0x61, 0x03, 0x07, 0x87
ADD_K, ADD_X, SUB_K, SUB_X, AND_K, OR_K = 0x04, 0x0C, 0x14, 0x1C, 0x54, 0x44
JA, JEQ, JGT, JGE, JGE_X, JSET, RET = 0x05, 0x15, 0x25, 0x35, 0x3D, 0x45, 0x06


def insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return INSN.pack(code, jt, jf, k)
