"""QUIC Initial decoder: RFC vectors, CRYPTO reassembly, bounds, hostile input, tshark."""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.decode import quic
from sensor.decode.quic import (QUIC_V1, QUIC_V2, QuicInitialTable, crypto_frames,
                                derive_initial_keys, looks_like_quic_initial)
from sensor.records import ClientHello, DecodeError, PacketContext
from sensor.stats import Stats

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_quic_samples",
                                               ROOT / "pcaps" / "make_quic_samples.py")
samples = importlib.util.module_from_spec(_spec)
sys.modules["make_quic_samples"] = samples
_spec.loader.exec_module(samples)

RFC_DCID = bytes.fromhex("8394c8f03e515708")  # RFC 9001 A / RFC 9369 A

# RFC 9001 Appendix A.2: the protected client Initial (DCID 0x8394c8f03e515708, pn 2).
RFC9001_CLIENT_INITIAL = bytes.fromhex("""
c000000001088394c8f03e5157080000 449e7b9aec34d1b1c98dd7689fb8ec11
d242b123dc9bd8bab936b47d92ec356c 0bab7df5976d27cd449f63300099f399
1c260ec4c60d17b31f8429157bb35a12 82a643a8d2262cad67500cadb8e7378c
8eb7539ec4d4905fed1bee1fc8aafba1 7c750e2c7ace01e6005f80fcb7df6212
30c83711b39343fa028cea7f7fb5ff89 eac2308249a02252155e2347b63d58c5
457afd84d05dfffdb20392844ae81215 4682e9cf012f9021a6f0be17ddd0c208
4dce25ff9b06cde535d0f920a2db1bf3 62c23e596d11a4f5a6cf3948838a3aec
4e15daf8500a6ef69ec4e3feb6b1d98e 610ac8b7ec3faf6ad760b7bad1db4ba3
485e8a94dc250ae3fdb41ed15fb6a8e5 eba0fc3dd60bc8e30c5c4287e53805db
059ae0648db2f64264ed5e39be2e20d8 2df566da8dd5998ccabdae053060ae6c
7b4378e846d29f37ed7b4ea9ec5d82e7 961b7f25a9323851f681d582363aa5f8
9937f5a67258bf63ad6f1a0b1d96dbd4 faddfcefc5266ba6611722395c906556
be52afe3f565636ad1b17d508b73d874 3eeb524be22b3dcbc2c7468d54119c74
68449a13d8e3b95811a198f3491de3e7 fe942b330407abf82a4ed7c1b311663a
c69890f4157015853d91e923037c227a 33cdd5ec281ca3f79c44546b9d90ca00
f064c99e3dd97911d39fe9c5d0b23a22 9a234cb36186c4819e8b9c5927726632
291d6a418211cc2962e20fe47feb3edf 330f2c603a9d48c0fcb5699dbfe58964
25c5bac4aee82e57a85aaf4e2513e4f0 5796b07ba2ee47d80506f8d2c25e50fd
14de71e6c418559302f939b0e1abd576 f279c4b2e0feb85c1f28ff18f58891ff
ef132eef2fa09346aee33c28eb130ff2 8f5b766953334113211996d20011a198
e3fc433f9f2541010ae17c1bf202580f 6047472fb36857fe843b19f5984009dd
c324044e847a4f4a0ab34f719595de37 252d6235365e9b84392b061085349d73
203a4a13e96f5432ec0fd4a1ee65accd d5e3904df54c1da510b0ff20dcc0c77f
cb2c0e0eb605cb0504db87632cf3d8b4 dae6e705769d1de354270123cb11450e
fc60ac47683d7b8d0f811365565fd98c 4c8eb936bcab8d069fc33bd801b03ade
a2e1fbc5aa463d08ca19896d2bf59a07 1b851e6c239052172f296bfb5e724047
90a2181014f3b94a4e97d117b4381303 68cc39dbb2d198065ae3986547926cd2
162f40a29f0c3c8745c0f50fba3852e5 66d44575c29d39a03f0cda721984b6f4
40591f355e12d439ff150aab7613499d bd49adabc8676eef023b15b65bfc5ca0
6948109f23f350db82123535eb8a7433 bdabcb909271a6ecbcb58b936a88cd4e
8f2e6ff5800175f113253d8fa9ca8885 c2f552e657dc603f252e1a8e308f76f0
be79e2fb8f5d5fbbe2e30ecadd220723 c8c0aea8078cdfcb3868263ff8f09400
54da48781893a7e49ad5aff4af300cd8 04a6b6279ab3ff3afb64491c85194aab
760d58a606654f9f4400e8b38591356f bf6425aca26dc85244259ff2b19c41b9
f96f3ca9ec1dde434da7d2d392b905dd f3d1f9af93d1af5950bd493f5aa731b4
056df31bd267b6b90a079831aaf579be 0a39013137aac6d404f518cfd4684064
7e78bfe706ca4cf5e9c5453e9f7cfd2b 8b4c8d169a44e55c88d4a9a7f9474241
e221af44860018ab0856972e194cd934
""")

# RFC 9001 Appendix A.3: the server's protected Initial reply (DCID empty, SCID f067a5502a4262b5).
RFC9001_SERVER_INITIAL = bytes.fromhex("""
cf000000010008f067a5502a4262b500 4075c0d95a482cd0991cd25b0aac406a
5816b6394100f37a1c69797554780bb3 8cc5a99f5ede4cf73c3ec2493a1839b3
dbcba3f6ea46c5b7684df3548e7ddeb9 c3bf9c73cc3f3bded74b562bfb19fb84
022f8ef4cdd93795d77d06edbb7aaf2f 58891850abbdca3d20398c276456cbc4
2158407dd074ee
""")

# RFC 9369 Appendix A.2: the protected QUIC v2 client Initial.
RFC9369_CLIENT_INITIAL = bytes.fromhex("""
d76b3343cf088394c8f03e5157080000 449ea0c95e82ffe67b6abcdb4298b485
dd04de806071bf03dceebfa162e75d6c 96058bdbfb127cdfcbf903388e99ad04
9f9a3dd4425ae4d0992cfff18ecf0fdb 5a842d09747052f17ac2053d21f57c5d
250f2c4f0e0202b70785b7946e992e58 a59ac52dea6774d4f03b55545243cf1a
12834e3f249a78d395e0d18f4d766004 f1a2674802a747eaa901c3f10cda5500
cb9122faa9f1df66c392079a1b40f0de 1c6054196a11cbea40afb6ef5253cd68
18f6625efce3b6def6ba7e4b37a40f77 32e093daa7d52190935b8da58976ff33
12ae50b187c1433c0f028edcc4c2838b 6a9bfc226ca4b4530e7a4ccee1bfa2a3
d396ae5a3fb512384b2fdd851f784a65 e03f2c4fbe11a53c7777c023462239dd
6f7521a3f6c7d5dd3ec9b3f233773d4b 46d23cc375eb198c63301c21801f6520
bcfb7966fc49b393f0061d974a2706df 8c4a9449f11d7f3d2dcbb90c6b877045
636e7c0c0fe4eb0f697545460c806910 d2c355f1d253bc9d2452aaa549e27a1f
ac7cf4ed77f322e8fa894b6a83810a34 b361901751a6f5eb65a0326e07de7c12
16ccce2d0193f958bb3850a833f7ae43 2b65bc5a53975c155aa4bcb4f7b2c4e5
4df16efaf6ddea94e2c50b4cd1dfe060 17e0e9d02900cffe1935e0491d77ffb4
fdf85290fdd893d577b1131a610ef6a5 c32b2ee0293617a37cbb08b847741c3b
8017c25ca9052ca1079d8b78aebd4787 6d330a30f6a8c6d61dd1ab5589329de7
14d19d61370f8149748c72f132f0fc99 f34d766c6938597040d8f9e2bb522ff9
9c63a344d6a2ae8aa8e51b7b90a4a806 105fcbca31506c446151adfeceb51b91
abfe43960977c87471cf9ad4074d30e1 0d6a7f03c63bd5d4317f68ff325ba3bd
80bf4dc8b52a0ba031758022eb025cdd 770b44d6d6cf0670f4e990b22347a7db
848265e3e5eb72dfe8299ad7481a4083 22cac55786e52f633b2fb6b614eaed18
d703dd84045a274ae8bfa73379661388 d6991fe39b0d93debb41700b41f90a15
c4d526250235ddcd6776fc77bc97e7a4 17ebcb31600d01e57f32162a8560cacc
7e27a096d37a1a86952ec71bd89a3e9a 30a2a26162984d7740f81193e8238e61
f6b5b984d4d3dfa033c1bb7e4f0037fe bf406d91c0dccf32acf423cfa1e70710
10d3f270121b493ce85054ef58bada42 310138fe081adb04e2bd901f2f13458b
3d6758158197107c14ebb193230cd115 7380aa79cae1374a7c1e5bbcb80ee23e
06ebfde206bfb0fcbc0edc4ebec30966 1bdd908d532eb0c6adc38b7ca7331dce
8dfce39ab71e7c32d318d136b6100671 a1ae6a6600e3899f31f0eed19e3417d1
34b90c9058f8632c798d4490da498730 7cba922d61c39805d072b589bd52fdf1
e86215c2d54e6670e07383a27bbffb5a ddf47d66aa85a0c6f9f32e59d85a44dd
5d3b22dc2be80919b490437ae4f36a0a e55edf1d0b5cb4e9a3ecabee93dfc6e3
8d209d0fa6536d27a5d6fbb17641cde2 7525d61093f1b28072d111b2b4ae5f89
d5974ee12e5cf7d5da4d6a31123041f3 3e61407e76cffcdcfd7e19ba58cf4b53
6f4c4938ae79324dc402894b44faf8af bab35282ab659d13c93f70412e85cb19
9a37ddec600545473cfb5a05e08d0b20 9973b2172b4d21fb69745a262ccde96b
a18b2faa745b6fe189cf772a9f84cbfc
""")

# RFC 9001 A.2 / RFC 9369 A.2: the start of the unprotected payload (one CRYPTO frame).
RFC_CRYPTO_FRAME_START = bytes.fromhex("060040f1010000ed0303ebf8fa56f129")


def ctx(ts: float = 1.0, sport: int = 51234, dport: int = 443, src: str = "192.168.10.23",
        dst: str = "198.51.100.7") -> PacketContext:
    return PacketContext(ts=ts, src_ip=src, dst_ip=dst, src_port=sport, dst_port=dport,
                         transport="udp")


def initial(frames: bytes, pn: int = 0, dcid: bytes = b"\x11" * 8,
            version: int = QUIC_V1, **kwargs) -> bytes:
    return samples.client_initial(version, dcid, b"", pn, frames, **kwargs)


def hello_message(sni: str = "s07.upd.kaspersky.com", post_quantum: bool = True) -> bytes:
    return samples.client_hello(sni, "test", post_quantum=post_quantum)


def feed_all(table: QuicInitialTable, datagrams, context=None) -> list[ClientHello]:
    out = []
    for datagram in datagrams:
        hello = table.feed(datagram, context or ctx())
        if hello is not None:
            out.append(hello)
    return out


# -- RFC test vectors ----------------------------------------------------------------------

def test_rfc9001_a1_initial_keys():
    assert derive_initial_keys(RFC_DCID, QUIC_V1) == (
        bytes.fromhex("1f369613dd76d5467730efcbe3b1a22d"),
        bytes.fromhex("fa044b2f42a3fd3b46fb255c"),
        bytes.fromhex("9f50449e04a0e810283a1e9933adedd2"))
    assert derive_initial_keys(RFC_DCID, QUIC_V1, b"server in") == (
        bytes.fromhex("cf3a5331653c364c88f0f379b6067e37"),
        bytes.fromhex("0ac1493ca1905853b0bba03e"),
        bytes.fromhex("c206b8d9b9f0f37644430b490eeaa314"))


def test_rfc9369_a1_initial_keys():
    assert derive_initial_keys(RFC_DCID, QUIC_V2) == (
        bytes.fromhex("8b1a0bc121284290a29e0971b5cd045d"),
        bytes.fromhex("91f73e2351d8fa91660e909f"),
        bytes.fromhex("45b95e15235d6f45a6b19cbcb0294ba9"))
    assert derive_initial_keys(RFC_DCID, QUIC_V2, b"server in") == (
        bytes.fromhex("82db637861d55e1d011f19ea71d5d2a7"),
        bytes.fromhex("dd13c276499c0249d3310652"),
        bytes.fromhex("edf6d05c83121201b436e16877593c3a"))


@pytest.mark.parametrize("fast_context", [True, False], ids=["context", "cipher"])
def test_header_protection_mask_rfc9001_a2(monkeypatch, fast_context):
    """Both ways of making the AES-ECB encryptor (cryptography's context constructor, and
    ``Cipher`` where a version has none) give RFC 9001 A.2's mask."""
    monkeypatch.setattr(quic, "_cipher_makers", None)
    if not fast_context:
        monkeypatch.setattr(quic, "_encryption_context", lambda: None)
    else:
        assert quic._encryption_context() is not None, "this cryptography has no context constructor"
    ecb_encrypt = quic._ciphers()[1]
    mask = ecb_encrypt(bytes.fromhex("9f50449e04a0e810283a1e9933adedd2"))(
        bytes.fromhex("d1b1c98dd7689fb8ec11d242b123dc9b"))
    assert mask[:5] == bytes.fromhex("437b9aec36")


@pytest.mark.parametrize("broken", ["raises", "wrong"])
def test_a_context_constructor_that_misbehaves_is_not_used(monkeypatch, broken):
    """The constructor is not cryptography's public API: one that raises or encrypts
    differently from ``Cipher`` leaves the public path in use, and Initials still open."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    def misbehaving(algorithm, mode):
        if broken == "raises":
            raise TypeError("changed signature")
        return Cipher(algorithms.AES(bytes(16)), mode).encryptor()

    monkeypatch.setattr(quic, "_context_constructor", lambda: misbehaving)
    assert quic._encryption_context() is None
    monkeypatch.setattr(quic, "_cipher_makers", None)
    hello = QuicInitialTable(Stats()).feed(RFC9001_CLIENT_INITIAL, ctx())
    assert hello.server_name.text == "example.com"


def test_unknown_version_has_no_keys():
    with pytest.raises(DecodeError) as err:
        derive_initial_keys(RFC_DCID, 0xFF00001D)
    assert err.value.reason == "quic_bad_version"


@pytest.mark.parametrize("packet,version", [(RFC9001_CLIENT_INITIAL, QUIC_V1),
                                            (RFC9369_CLIENT_INITIAL, QUIC_V2)],
                         ids=["rfc9001", "rfc9369"])
def test_rfc_client_initial_decrypts_to_published_payload(packet, version):
    assert looks_like_quic_initial(packet)
    parsed_version, dcid, pn_offset, packet_end = quic.parse_initial_header(packet)
    assert (parsed_version, dcid, packet_end) == (version, RFC_DCID, len(packet))
    frames = quic.decrypt_initial(packet, pn_offset, packet_end, quic.InitialKeys(dcid, version))
    assert len(frames) == 1162  # "a 1162-byte payload"
    assert frames.startswith(RFC_CRYPTO_FRAME_START)
    assert frames[0xF5:] == bytes(1162 - 0xF5)  # the rest is PADDING


@pytest.mark.parametrize("packet", [RFC9001_CLIENT_INITIAL, RFC9369_CLIENT_INITIAL],
                         ids=["rfc9001", "rfc9369"])
def test_rfc_client_initial_yields_example_com(packet):
    table = QuicInitialTable(Stats())
    hello = table.feed(packet, ctx())
    assert isinstance(hello, ClientHello)
    assert hello.server_name.text == "example.com"
    assert hello.over == "quic"
    assert hello.cipher_suites == (0x1301, 0x1302)
    assert table.feed(packet, ctx(ts=2.0)) is None  # a retransmission is not a second hello


def test_rfc_server_initial_is_ignored_not_malformed():
    stats = Stats()
    table = QuicInitialTable(stats)
    assert looks_like_quic_initial(RFC9001_SERVER_INITIAL)
    assert table.feed(RFC9001_SERVER_INITIAL, ctx(sport=443, dport=51234)) is None
    # Even on unusual ports its empty DCID gives it away before any decryption.
    assert table.feed(RFC9001_SERVER_INITIAL, ctx(sport=4433, dport=4433)) is None
    assert not table.connections and not table.keys


# -- header pre-check ----------------------------------------------------------------------

def test_looks_like_quic_initial_accepts_v1_and_v2_initials_only():
    v1 = initial(b"\x01")
    v2 = initial(b"\x01", version=QUIC_V2)
    assert looks_like_quic_initial(v1) and looks_like_quic_initial(v2)
    assert not looks_like_quic_initial(bytes((v1[0] | 0x10,)) + v1[1:])  # v1 0-RTT type
    assert not looks_like_quic_initial(bytes((v2[0] & 0xCF,)) + v2[1:])  # v2 Retry type
    assert not looks_like_quic_initial(bytes((v1[0] & 0xBF,)) + v1[1:])  # fixed bit clear
    assert not looks_like_quic_initial(bytes((v1[0] & 0x7F,)) + v1[1:])  # short header
    assert not looks_like_quic_initial(v1[:5] + b"\x15" + v1[6:])  # DCID length 21
    assert not looks_like_quic_initial(v1[:1] + b"\xff\x00\x00\x1d" + v1[5:])  # draft-29
    assert not looks_like_quic_initial(v1[:6])
    assert not looks_like_quic_initial(b"")


# -- frames ----------------------------------------------------------------------------------

def test_ack_ping_padding_are_skipped_and_connection_close_stops():
    ack = b"\x02\x05\x00\x01\x00" + b"\x00\x01"  # largest 5, one extra range
    ack_ecn = b"\x03\x05\x00\x00\x00" + b"\x01\x02\x03"
    frames = (b"\x00\x00" + ack + b"\x01" + ack_ecn + samples.crypto_frame(7, b"abc")
              + b"\x1c\x00\x00\x00" + b"\xff\xff garbage after close")
    assert crypto_frames(frames) == [(7, b"abc")]


def test_padding_runs_between_and_after_crypto_frames():
    """Chrome scatters PADDING and PING between CRYPTO pieces, and pads every Initial to
    1,200 bytes at its end: each run is skipped whole, whatever its length."""
    frames = (samples.crypto_frame(9, b"world") + b"\x00" * 300 + b"\x01"
              + b"\x00" + samples.crypto_frame(0, b"hello ") + b"\x00" * 877)
    assert crypto_frames(frames) == [(9, b"world"), (0, b"hello ")]
    assert crypto_frames(b"\x00" * 1200) == []


@pytest.mark.parametrize("frames,reason", [
    (b"\x08\x00GET /", "quic_bad_frame"),  # STREAM is not allowed in an Initial
    (b"\x1e", "quic_bad_frame"),  # HANDSHAKE_DONE
    (b"\x06\x00\x10abc", "quic_truncated"),  # CRYPTO length past the packet
    (b"\x02\x00\x00\x3f\x00", "quic_bad_frame"),  # 63 ACK ranges in 0 bytes
    (b"\x03\x00\x00\x00\x00\x01", "quic_truncated"),  # ECN counts missing
    (b"\x06\x80", "quic_truncated"),  # varint cut short
])
def test_bad_frames(frames, reason):
    with pytest.raises(DecodeError) as err:
        crypto_frames(frames)
    assert err.value.reason == reason


def test_coalesced_packets_after_the_initial_are_skipped():
    message = hello_message(post_quantum=False)
    first = initial(samples.crypto_frame(0, message), pad_to=0)
    trailing = samples.protect_long_header(QUIC_V1, 0x20, b"\x11" * 8, b"", 0, b"\x01" * 40,
                                           derive_initial_keys(b"\x22" * 8, QUIC_V1), pad_to=0)
    datagram = first + trailing + bytes(1200 - len(first) - len(trailing))
    hello = QuicInitialTable(Stats()).feed(datagram, ctx())
    assert hello.server_name.text == "s07.upd.kaspersky.com"


# -- reassembly ------------------------------------------------------------------------------

def test_v1_sample_two_initials():
    datagrams = [d for d, reply in samples.v1_datagrams() if not reply]
    table = QuicInitialTable(Stats())
    assert table.feed(datagrams[0], ctx()) is None
    hello = table.feed(datagrams[1], ctx())
    assert hello.server_name.text == samples.V1_SNI
    assert samples.X25519_MLKEM768 in hello.supported_groups
    assert table.feed(datagrams[1], ctx()) is None
    assert table.total_bytes == 0  # the buffer is released once the hello is out


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_shuffled_sample_in_every_packet_order(order):
    datagrams = [d for d, _ in samples.shuffled_datagrams()]
    table = QuicInitialTable(Stats())
    results = [table.feed(datagrams[i], ctx()) for i in order]
    assert results[:2] == [None, None]
    assert results[2].server_name.text == samples.SHUFFLED_SNI


def test_same_dcid_from_another_client_is_another_connection():
    datagrams = [d for d, reply in samples.v1_datagrams() if not reply]
    table = QuicInitialTable(Stats())
    assert table.feed(datagrams[0], ctx(src="192.168.10.23")) is None
    assert table.feed(datagrams[1], ctx(src="192.168.10.99")) is None
    assert table.feed(datagrams[1], ctx(src="192.168.10.23")).server_name.text == samples.V1_SNI
    assert len(table.connections) == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_order_and_duplication_reassembles(data):
    message = hello_message("dc1.ksn.kaspersky-labs.com")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(message) - 1), max_size=12)))
    pieces = samples.split_message(message, cuts)
    duplicates = data.draw(st.lists(st.sampled_from(pieces), max_size=3))
    frames = data.draw(st.permutations(pieces + duplicates))
    packet_count = data.draw(st.integers(2, 4))
    groups = [frames[i::packet_count] for i in range(packet_count)]
    datagrams = [initial(b"".join(samples.crypto_frame(o, d) for o, d in group) or b"\x01",
                         pn=pn) for pn, group in enumerate(groups)]
    hellos = feed_all(QuicInitialTable(Stats()), data.draw(st.permutations(datagrams)))
    assert len(hellos) == 1
    assert hellos[0].server_name.text == "dc1.ksn.kaspersky-labs.com"


def test_overlapping_frames_keep_first_bytes():
    message = hello_message(post_quantum=False)
    forged = message[:60] + b"X" * 40 + message[100:]
    table = QuicInitialTable(Stats())
    assert table.feed(initial(samples.crypto_frame(0, message[:100]), pn=0), ctx()) is None
    hello = table.feed(initial(samples.crypto_frame(60, forged[60:]), pn=1), ctx())
    assert hello.server_name.text == "s07.upd.kaspersky.com"


# -- bounds ----------------------------------------------------------------------------------

def test_crypto_cap_raises_once_then_ignores_connection():
    table = QuicInitialTable(Stats(), max_crypto_bytes=1024)
    datagrams = [d for d, reply in samples.v1_datagrams() if not reply]
    with pytest.raises(DecodeError) as err:
        table.feed(datagrams[0], ctx())  # 1100 bytes at offset 0 already exceed the cap
    assert err.value.reason == "quic_crypto_too_large"
    assert table.feed(datagrams[1], ctx()) is None
    assert table.total_bytes == 0


def test_declared_hello_length_over_cap():
    table = QuicInitialTable(Stats(), max_crypto_bytes=4096)
    message = hello_message()
    with pytest.raises(DecodeError) as err:
        table.feed(initial(samples.crypto_frame(0, b"\x01\x00\x20\x00" + message[4:200])), ctx())
    assert err.value.reason == "quic_crypto_too_large"


def test_non_client_hello_message():
    with pytest.raises(DecodeError) as err:
        QuicInitialTable(Stats()).feed(initial(samples.crypto_frame(0, b"\x02\x00\x00\x10")), ctx())
    assert err.value.reason == "quic_not_client_hello"


def test_too_many_crypto_pieces():
    gapped = range(10, 10 + 3 * (quic.MAX_CRYPTO_PIECES + 1), 3)
    frames = b"".join(samples.crypto_frame(offset, b"ab") for offset in gapped)
    with pytest.raises(DecodeError) as err:
        QuicInitialTable(Stats()).feed(initial(frames), ctx())
    assert err.value.reason == "quic_crypto_fragmented"


def test_connection_table_lru_eviction():
    stats = Stats()
    table = QuicInitialTable(stats, max_connections=2)
    partial = samples.crypto_frame(0, hello_message()[:100])
    for i in range(3):
        assert table.feed(initial(partial, dcid=bytes((i,)) * 8), ctx()) is None
    assert len(table.connections) == 2
    assert stats.evictions["quic_initial"] == 1
    assert stats.table_sizes["quic_initial"] == 2
    assert [key[-1] for key in table.connections] == [b"\x01" * 8, b"\x02" * 8]


def test_byte_budget_evicts_least_recent():
    stats = Stats()
    table = QuicInitialTable(stats, max_total_bytes=2500)
    partial = samples.crypto_frame(0, hello_message()[:1000])
    for i in range(3):
        table.feed(initial(partial, dcid=bytes((i,)) * 8), ctx())
    assert table.total_bytes == 2000
    assert stats.evictions["quic_initial"] == 1


def test_idle_connections_expire():
    stats = Stats()
    table = QuicInitialTable(stats, idle_timeout=30.0)
    datagrams = [d for d, reply in samples.v1_datagrams() if not reply]
    table.feed(datagrams[0], ctx(ts=100.0))
    table.expire(120.0)
    assert len(table.connections) == 1
    table.expire(131.0)
    assert not table.connections and table.total_bytes == 0
    assert stats.evictions["quic_initial_idle"] == 1
    assert stats.table_sizes["quic_initial"] == 0
    assert table.feed(datagrams[1], ctx(ts=132.0)) is None  # the first half is gone


def test_key_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(quic, "MAX_KEY_CACHE", 4)
    table = QuicInitialTable(Stats())
    for i in range(10):
        table.feed(initial(b"\x01", dcid=bytes((i,)) * 8), ctx())
    assert len(table.keys) == 4
    assert not table.connections  # PING-only Initials open no connection


def test_server_port_heuristic_skips_decryption():
    table = QuicInitialTable(Stats())
    datagram = initial(samples.crypto_frame(0, hello_message()))
    assert table.feed(datagram, ctx(sport=443, dport=50000)) is None
    assert not table.keys


# -- malformed samples and hostile input -----------------------------------------------------

@pytest.mark.parametrize("name,datagram,reason", samples.malformed_cases(),
                         ids=[case[0] for case in samples.malformed_cases()])
def test_malformed_cases(name, datagram, reason):
    if reason is None:
        assert not looks_like_quic_initial(datagram)
        return
    assert looks_like_quic_initial(datagram)
    with pytest.raises(DecodeError) as err:
        QuicInitialTable(Stats()).feed(datagram, ctx())
    assert err.value.reason == reason


def _feed_quietly(table: QuicInitialTable, payload: bytes) -> None:
    try:
        table.feed(payload, ctx())
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1400))
def test_random_bytes_only_raise_decode_error(payload):
    table = QuicInitialTable(Stats())
    looks_like_quic_initial(payload)
    _feed_quietly(table, payload)
    _feed_quietly(table, RFC9001_CLIENT_INITIAL[:6] + payload)
    try:
        crypto_frames(payload)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_initials_only_raise_decode_error(data):
    base = data.draw(st.sampled_from([RFC9001_CLIENT_INITIAL, RFC9369_CLIENT_INITIAL,
                                      *[d for d, _ in samples.shuffled_datagrams()]]))
    packet = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(packet) - 1))
        packet[pos] = data.draw(st.integers(0, 255))
    packet = bytes(packet[:data.draw(st.integers(0, len(packet)))])
    _feed_quietly(QuicInitialTable(Stats()), packet)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.integers(0, 2))
def test_random_plaintext_in_valid_encryption_only_raises_decode_error(frames, pn):
    """Authenticated garbage reaches the frame parser and the reassembly."""
    table = QuicInitialTable(Stats(), max_crypto_bytes=2048)
    _feed_quietly(table, initial(frames, pn=pn))
    _feed_quietly(table, initial(samples.crypto_frame(0, b"\x01\x00\x01\x00") + frames, pn=pn + 1))


# -- settling in the batch path --------------------------------------------------------------

def _may_name_kaspersky(message: bytes) -> bool:
    """A stand-in for decode.packet.Interest.hello_may_match."""
    return b"kaspersky" in message


def _split_initials(message: bytes, cut: int, dcid: bytes) -> list[bytes]:
    return [initial(samples.crypto_frame(0, message[:cut]), pn=0, dcid=dcid),
            initial(samples.crypto_frame(cut, message[cut:]), pn=1, dcid=dcid)]


_ORDINARY = hello_message("www.example.org", post_quantum=False)
_WATCHED = hello_message("s07.upd.kaspersky.com", post_quantum=False)
# Client datagrams of several connections, each on its own DCID.
_DATAGRAMS = [
    initial(samples.crypto_frame(0, _ORDINARY), dcid=b"\x01" * 8),
    initial(samples.crypto_frame(0, _ORDINARY), pn=1, dcid=b"\x01" * 8),  # a retransmission
    initial(samples.crypto_frame(0, _WATCHED), dcid=b"\x02" * 8),
    *_split_initials(hello_message("www.example.org"), 1000, b"\x03" * 8),
    *[d for d, reply in samples.v1_datagrams() if not reply],
    initial(samples.crypto_frame(200, _ORDINARY[200:]) + b"\x01" + samples.crypto_frame(0, _ORDINARY[:200]),
            dcid=b"\x04" * 8),
    # The first CRYPTO frame's bytes win where two overlap, in ``feed`` as here.
    initial(samples.crypto_frame(0, _ORDINARY[:80]) + samples.crypto_frame(0, _WATCHED), dcid=b"\x05" * 8),
    initial(samples.crypto_frame(0, _WATCHED[:80]) + samples.crypto_frame(0, _ORDINARY), dcid=b"\x06" * 8),
    initial(b"\x01", dcid=b"\x07" * 8),  # PING only
    initial(samples.crypto_frame(0, _ORDINARY), dcid=b"\x08" * 4),  # short DCID: not a client's first
    initial(samples.crypto_frame(0, b"\x02\x00\x00\x10" + bytes(16)), dcid=b"\x09" * 8),
    initial(samples.crypto_frame(0, _ORDINARY[:300]), dcid=b"\x01" * 8),  # a hello begun again
    initial(samples.crypto_frame(70_000, b"ab"), pn=2, dcid=b"\x03" * 8),  # past the cap
    initial(b"".join(samples.crypto_frame(2000 + 3 * n, b"ab") for n in range(70)), pn=3,
            dcid=b"\x03" * 8),  # too many pieces
    *[datagram for _, datagram, reason in samples.malformed_cases() if reason is not None][:4],
]


def _table_state(table: QuicInitialTable) -> tuple:
    return ([(key, conn.done, bytes(conn.prefix), dict(conn.pending), conn.last)
             for key, conn in table.connections.items()],
            table.total_bytes, list(table.keys), dict(table.stats.evictions),
            dict(table.stats.table_sizes), dict(table.stats.malformed))


def _fed(table: QuicInitialTable, datagram: bytes, context: PacketContext) -> str | None:
    """``feed``, its error counted as PacketDecoder.decode counts it."""
    try:
        hello = table.feed(datagram, context, _may_name_kaspersky)
    except DecodeError as err:
        table.stats.bad(err.reason)
        return None
    return None if hello is None else hello.server_name.text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_DATAGRAMS) - 1), st.sampled_from(["192.168.10.23", "10.0.0.9"])),
                min_size=1, max_size=14), st.integers(2, 6), st.sampled_from([1500, 2500, 1 << 20]))
def test_settling_initials_leaves_what_feeding_them_leaves(arrivals, max_connections, max_total_bytes):
    """The batch path settles what it can (QuicInitialTable.settle_initial) and feeds the
    rest: hellos, malformed counters and the table (connections, their bytes and order,
    evictions, key cache) come out as when every datagram is fed, within tight bounds too."""
    fed, settled = (QuicInitialTable(Stats(), max_connections=max_connections,
                                     max_total_bytes=max_total_bytes) for _ in range(2))
    for n, (index, src) in enumerate(arrivals):
        datagram, context = _DATAGRAMS[index], ctx(ts=1.0 + n, src=src)
        expected = _fed(fed, datagram, context)
        key = (context.src_ip, context.src_port, context.dst_ip, context.dst_port)
        if settled.settle_initial(datagram, key, context.ts, _may_name_kaspersky):
            assert expected is None
        else:
            assert _fed(settled, datagram, context) == expected
        assert _table_state(settled) == _table_state(fed)


def test_what_settling_takes_and_what_it_leaves_to_feed():
    table = QuicInitialTable(Stats())
    key = ("192.168.10.23", 51234, "198.51.100.7", 443)
    assert table.settle_initial(_DATAGRAMS[0], key, 1.0, _may_name_kaspersky)
    assert [conn.done for conn in table.connections.values()] == [True]
    assert table.settle_initial(_DATAGRAMS[1], key, 2.0, _may_name_kaspersky)
    assert not table.settle_initial(_DATAGRAMS[2], key, 3.0, _may_name_kaspersky)
    assert len(table.connections) == 1, "a hello the screen lets through leaves no trace"
    first, second = _split_initials(hello_message("www.example.org"), 1000, b"\x03" * 8)
    assert table.settle_initial(first, key, 4.0, _may_name_kaspersky), "held, as feed holds it"
    assert table.total_bytes == 1000
    assert table.settle_initial(second, key, 5.0, _may_name_kaspersky), "completed and ruled out"
    assert table.total_bytes == 0
    first, second = _split_initials(hello_message("s07.upd.kaspersky.com"), 1000, b"\x0a" * 8)
    assert table.settle_initial(first, key, 6.0, _may_name_kaspersky)
    assert not table.settle_initial(second, key, 7.0, _may_name_kaspersky)
    assert table.feed(second, ctx(ts=7.0), _may_name_kaspersky).server_name.text == "s07.upd.kaspersky.com"
    assert table.total_bytes == 0
    # A held hello's continuation that ``feed`` would refuse is counted as the decoder counts it.
    first, _ = _split_initials(hello_message("www.example.org"), 1000, b"\x0b" * 8)
    assert table.settle_initial(first, key, 8.0, _may_name_kaspersky)
    past_the_cap = initial(samples.crypto_frame(70_000, b"ab"), pn=2, dcid=b"\x0b" * 8)
    assert table.settle_initial(past_the_cap, key, 9.0, _may_name_kaspersky)
    assert table.stats.malformed == {"quic_crypto_too_large": 1}
    assert table.total_bytes == 0 and table.connections[key + (b"\x0b" * 8,)].done


# -- generator and tshark cross-check --------------------------------------------------------

@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quic")
    assert samples.main(["--out", str(out)]) == 0
    return out


def _udp_payloads(path: Path):
    import dpkt

    with open(path, "rb") as handle:
        for ts, frame in dpkt.pcap.Reader(handle):
            ip = dpkt.ethernet.Ethernet(frame).data
            udp = ip.data
            src = dpkt.utils.inet_to_str(ip.src)
            dst = dpkt.utils.inet_to_str(ip.dst)
            yield ctx(ts=ts, sport=udp.sport, dport=udp.dport, src=src, dst=dst), bytes(udp.data)


def _decode_file(path: Path) -> tuple[list[ClientHello], Stats]:
    stats = Stats()
    table = QuicInitialTable(stats)
    hellos = []
    for context, payload in _udp_payloads(path):
        if not looks_like_quic_initial(payload):
            continue
        try:
            hello = table.feed(payload, context)
        except DecodeError as err:
            stats.bad(err.reason)
            continue
        if hello is not None:
            hellos.append(hello)
    return hellos, stats


def test_generator_is_deterministic(sample_dir, tmp_path):
    samples.main(["--out", str(tmp_path)])
    for name in ("quic_v1.pcap", "quic_v2.pcap", "quic_shuffled.pcap", "quic_malformed.pcap"):
        assert (tmp_path / name).read_bytes() == (sample_dir / name).read_bytes()


def test_client_datagrams_are_padded(sample_dir):
    for name in ("quic_v1.pcap", "quic_v2.pcap", "quic_shuffled.pcap"):
        for context, payload in _udp_payloads(sample_dir / name):
            if context.dst_port == samples.SERVER_PORT:
                assert len(payload) >= samples.MIN_DATAGRAM


@pytest.mark.parametrize("name,sni,ip", [
    ("quic_v1.pcap", samples.V1_SNI, samples.CLIENT_V4),
    ("quic_v2.pcap", samples.V2_SNI, samples.CLIENT_V6),
    ("quic_shuffled.pcap", samples.SHUFFLED_SNI, samples.CLIENT_V4),
])
def test_sample_files_decode(sample_dir, name, sni, ip):
    hellos, stats = _decode_file(sample_dir / name)
    assert [h.server_name.text for h in hellos] == [sni]
    assert hellos[0].ctx.src_ip == ip and hellos[0].alpn == ("h3",)
    assert not stats.malformed  # the server's Initial in quic_v1 is not counted


def test_malformed_file_counts_every_reason(sample_dir):
    hellos, stats = _decode_file(sample_dir / "quic_malformed.pcap")
    expected: dict[str, int] = {}
    for _, _, reason in samples.malformed_cases():
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    assert not hellos
    assert dict(stats.malformed) == expected


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("name", ["quic_v1.pcap", "quic_v2.pcap", "quic_shuffled.pcap"])
def test_tshark_agrees(sample_dir, name):
    """tshark 4.0 decrypts v1 and (checked on 4.0.17) v2 Initials and reassembles CRYPTO."""
    result = subprocess.run(
        ["tshark", "-n", "-r", str(sample_dir / name), "-T", "fields",
         "-e", "tls.handshake.extensions_server_name"],
        capture_output=True, text=True, timeout=120, check=True)
    tshark_names = [line for line in result.stdout.splitlines() if line]
    hellos, _ = _decode_file(sample_dir / name)
    assert tshark_names == [h.server_name.text for h in hellos]


def test_packet_decoder_emits_quic_hello(sample_dir):
    packet = pytest.importorskip("sensor.decode.packet", exc_type=ImportError)
    import dpkt

    stats = Stats()
    decoder = packet.PacketDecoder(stats)
    names = []
    with open(sample_dir / "quic_shuffled.pcap", "rb") as handle:
        for ts, frame in dpkt.pcap.Reader(handle):
            for record in decoder.decode(ts, 1, frame):
                if isinstance(record, ClientHello):
                    names.append((record.over, record.server_name.text))
    assert names == [("quic", samples.SHUFFLED_SNI)]
