"""Just enough Ethernet/IPv4/UDP/TCP/DHCP for the network backend tests to talk to passt like a guest."""

from __future__ import annotations

import struct

BROADCAST = b"\xff" * 6
ETH_IPV4 = 0x0800
DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCPDISCOVER = 1
DHCPOFFER = 2
TCP_SYN = 0x02
TCP_ACK = 0x10


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, src, dst)
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def dhcp_discover(mac: bytes, xid: int) -> bytes:
    """A broadcast DHCPDISCOVER from 0.0.0.0:68 with the message-type option, as udhcpc sends it."""
    bootp = struct.pack("!BBBBIHHIIII16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, 0, 0, 0, 0, mac, b"", b"")
    options = DHCP_MAGIC + bytes([53, 1, DHCPDISCOVER, 255])
    udp_payload = bootp + options
    udp = struct.pack("!HHHH", 68, 67, 8 + len(udp_payload), 0) + udp_payload  # UDP checksum 0: none
    return ethernet(BROADCAST, mac, ETH_IPV4, ipv4(bytes(4), b"\xff" * 4, 17, udp))


def parse_dhcp(frame: bytes) -> dict | None:
    """The fields of a DHCP reply in ``frame`` (None if it is not one)."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = 14 + ihl
    sport, dport = struct.unpack_from("!HH", frame, udp)
    bootp = udp + 8
    if (sport, dport) != (67, 68) or frame[bootp] != 2 or frame[bootp + 236:bootp + 240] != DHCP_MAGIC:
        return None
    options: dict[int, bytes] = {}
    i = bootp + 240
    while i < len(frame) and frame[i] != 255:
        if frame[i] == 0:
            i += 1
            continue
        options[frame[i]] = frame[i + 2:i + 2 + frame[i + 1]]
        i += 2 + frame[i + 1]
    return {"xid": struct.unpack_from("!I", frame, bootp + 4)[0], "yiaddr": frame[bootp + 16:bootp + 20],
            "server_mac": frame[6:12], "options": options}


def tcp_syn(src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, seq: int) -> bytes:
    head = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, TCP_SYN, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(head))
    head = head[:16] + struct.pack("!H", checksum(pseudo + head)) + head[18:]
    return ethernet(dst_mac, src_mac, ETH_IPV4, ipv4(src, dst, 6, head))


def parse_tcp(frame: bytes) -> dict | None:
    if len(frame) < 14 + 20 + 20 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    t = 14 + ihl
    sport, dport, seq, ack, _off, flags = struct.unpack_from("!HHIIBB", frame, t)
    return {"src": frame[26:30], "dst": frame[30:34], "sport": sport, "dport": dport, "seq": seq, "ack": ack,
            "flags": flags}
