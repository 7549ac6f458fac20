"""The checksums ext4 keeps over its own metadata: CRC32C (metadata_csum) and CRC16 (uninit_bg).

Both are the kernel's raw forms: the seed is passed in and nothing is inverted at the end.
"""

from __future__ import annotations


def _table(poly: int, width: int) -> tuple[int, ...]:
    rows = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        rows.append(crc & ((1 << width) - 1))
    return tuple(rows)


_CRC32C = _table(0x82F63B78, 32)
_CRC16 = _table(0xA001, 16)


def crc32c(crc: int, data: bytes) -> int:
    """The kernel's ``crc32c_le(crc, data)`` (ext4_chksum)."""
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def crc16(crc: int, data: bytes) -> int:
    """The kernel's ``crc16(crc, data)`` (the ANSI polynomial, reflected)."""
    table = _CRC16
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
