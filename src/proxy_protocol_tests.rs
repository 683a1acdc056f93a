use proptest::prelude::*;

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn done(buf: &[u8], accept: Accept) -> (Header, usize) {
    match decode(buf, accept) {
        Ok(Decoded::Done { header, consumed }) => (header, consumed),
        other => panic!("{buf:?}: {other:?}"),
    }
}

#[test]
fn v1_encodes_the_spec_line_for_tcp4_and_tcp6() {
    let e = encode(Version::V1, Transport::Stream, sa("192.0.2.1:56324"), sa("198.51.100.7:443"));
    assert_eq!(e.as_bytes(), b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n");
    let e = encode(Version::V1, Transport::Stream, sa("[2001:db8::1]:1"), sa("[::1]:80"));
    assert_eq!(e.as_bytes(), b"PROXY TCP6 2001:db8::1 ::1 1 80\r\n");
    // Mixed families: the IPv4 one is written IPv4-mapped.
    let e = encode(Version::V1, Transport::Stream, sa("10.0.0.1:5"), sa("[2001:db8::2]:6"));
    assert_eq!(e.as_bytes(), b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 5 6\r\n");
    // The longest possible line fits the spec's 107 bytes.
    let long = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535";
    let e = encode(Version::V1, Transport::Stream, sa(long), sa(long));
    assert!(e.as_bytes().len() <= V1_MAX_BYTES && e.as_bytes().ends_with(b"\r\n"), "{:?}", e.as_bytes());
}

#[test]
fn v2_encodes_the_spec_bytes_for_each_family_and_transport() {
    let e = encode(Version::V2, Transport::Stream, sa("192.0.2.1:1"), sa("198.51.100.7:443"));
    let mut want = V2_SIGNATURE.to_vec();
    want.extend([0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 7, 0, 1, 1, 187]);
    assert_eq!(e.as_bytes(), &want[..]);
    let e = encode(Version::V2, Transport::Dgram, sa("[::1]:53"), sa("[::2]:54"));
    assert_eq!(&e.as_bytes()[12..16], &[0x21, 0x22, 0, 36]);
    assert_eq!(e.as_bytes().len(), 16 + 36);
    // v1 has no datagram form: a datagram header is always v2.
    let e = encode(Version::V1, Transport::Dgram, sa("10.0.0.1:1"), sa("10.0.0.2:2"));
    assert_eq!(&e.as_bytes()[..12], &V2_SIGNATURE);
    assert_eq!(e.as_bytes()[13], 0x12);
}

#[test]
fn v2_local_unspec_and_unix_headers_carry_no_addresses() {
    let mut local = V2_SIGNATURE.to_vec();
    local.extend([0x20, 0x00, 0, 0]);
    assert_eq!(done(&local, Accept::Any), (Header { version: Version::V2, addresses: None }, 16));
    // LOCAL with addresses: they are skipped, not used.
    let mut local = V2_SIGNATURE.to_vec();
    local.extend([0x20, 0x11, 0, 12]);
    local.extend([0; 12]);
    assert_eq!(done(&local, Accept::Any).0.addresses, None);
    // LOCAL with a family and no block at all (length 0): the family is
    // ignored, as the spec says; so is a block of any other content.
    for family in [0x11, 0x21, 0x31, 0x12] {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, family, 0, 0]);
        assert_eq!(done(&local, Accept::Any), (Header { version: Version::V2, addresses: None }, 16));
    }
    let mut local = V2_SIGNATURE.to_vec();
    local.extend([0x20, 0x11, 0, 2, 0xff, 0xff]);
    assert_eq!(done(&local, Accept::Any).1, 18, "a LOCAL block is skipped, not parsed as TLVs");
    let mut unix = V2_SIGNATURE.to_vec();
    unix.extend([0x21, 0x31, 0, 216]);
    unix.extend([0; 216]);
    assert_eq!(done(&unix, Accept::Any), (Header { version: Version::V2, addresses: None }, 232));
}

#[test]
fn v1_unknown_is_accepted_with_no_addresses_and_the_rest_of_its_line_ignored() {
    let (h, n) = done(b"PROXY UNKNOWN\r\nGET", Accept::Any);
    assert_eq!((h.addresses, n), (None, 15));
    let (h, n) = done(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Accept::V1);
    assert_eq!((h.addresses, n), (None, 35));
}

#[test]
fn v2_tlvs_are_skipped_when_they_tile_the_header() {
    let mut h = encode(Version::V2, Transport::Stream, sa("1.2.3.4:5"), sa("6.7.8.9:10")).as_bytes().to_vec();
    h[15] = 12 + 3 + 2; // one TLV of 2 bytes
    h.extend([0x04, 0, 2, 0xaa, 0xbb]); // PP2_TYPE_NOOP
    h.extend(b"payload");
    let (header, n) = done(&h, Accept::V2);
    assert_eq!(n, 16 + 17);
    assert_eq!(header.addresses.unwrap().source, sa("1.2.3.4:5"));
    h[15] = 12 + 3 + 1; // the TLV's length now runs past the header
    h.truncate(16 + 16);
    assert_eq!(decode(&h, Accept::Any), Err(ProxyHeaderError::V2BadTlv(28)));
}

#[test]
fn malformed_headers_are_refused_with_a_reason() {
    let err = |buf: &[u8]| decode(buf, Accept::Any).unwrap_err();
    assert_eq!(err(b"GET / HTTP/1.1\r\n"), ProxyHeaderError::BadSignature);
    assert_eq!(err(b"PROXX"), ProxyHeaderError::BadSignature);
    assert_eq!(err(b"\r\n\r\n\0\r\nQUIX"), ProxyHeaderError::BadSignature);
    assert_eq!(
        err(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
        ProxyHeaderError::V1UnknownProtocol("TCP5".into())
    );
    assert_eq!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), ProxyHeaderError::V1FieldCount(3));
    assert_eq!(err(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"), ProxyHeaderError::V1FieldCount(5));
    assert!(matches!(err(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"), ProxyHeaderError::V1BadField { .. }));
    assert!(matches!(err(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n"), ProxyHeaderError::V1BadField { .. }));
    assert!(matches!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"), ProxyHeaderError::V1BadField { .. }));
    assert!(matches!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"), ProxyHeaderError::V1BadField { .. }));
    assert!(matches!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"), ProxyHeaderError::V1BadField { .. }));
    assert!(matches!(err(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"), ProxyHeaderError::V1BadField { .. }));
    assert_eq!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n"), ProxyHeaderError::V1NotText);
    // No CRLF within 107 bytes, even though the line could go on.
    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(V1_MAX_BYTES, b'a');
    assert_eq!(err(&long), ProxyHeaderError::V1TooLong);
    long.truncate(V1_MAX_BYTES - 1);
    assert_eq!(decode(&long, Accept::Any), Ok(Decoded::NeedMore));
    let v2 = |tail: &[u8]| [&V2_SIGNATURE[..], tail].concat();
    assert_eq!(err(&v2(&[0x11])), ProxyHeaderError::V2BadVersionCommand(0x11));
    assert_eq!(err(&v2(&[0x22])), ProxyHeaderError::V2BadVersionCommand(0x22));
    assert_eq!(err(&v2(&[0x21, 0x41])), ProxyHeaderError::V2BadFamily(0x41));
    assert_eq!(err(&v2(&[0x21, 0x13])), ProxyHeaderError::V2BadFamily(0x13));
    assert_eq!(err(&v2(&[0x21, 0x11, 0, 11])), ProxyHeaderError::V2LengthTooShort { length: 11, needed: 12 });
    assert_eq!(err(&v2(&[0x21, 0x21, 0, 12])), ProxyHeaderError::V2LengthTooShort { length: 12, needed: 36 });
    assert_eq!(err(&v2(&[0x21, 0x11, 0xff, 0xff])), ProxyHeaderError::V2TooLong(16 + 65_535));
}

#[test]
fn a_port_accepting_one_version_refuses_the_other_at_its_first_byte() {
    assert_eq!(decode(b"P", Accept::V2), Err(ProxyHeaderError::VersionNotAccepted(Version::V1, Version::V2)));
    assert_eq!(
        decode(b"\r", Accept::V1),
        Err(ProxyHeaderError::VersionNotAccepted(Version::V2, Version::V1))
    );
    assert_eq!(decode(b"", Accept::V2), Ok(Decoded::NeedMore));
}

fn any_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port))),
    ]
}

proptest! {
    #[test]
    fn every_encoded_header_decodes_to_its_addresses_and_length_whatever_follows(
        source in any_addr(),
        destination in any_addr(),
        v2 in any::<bool>(),
        dgram in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let version = if v2 { Version::V2 } else { Version::V1 };
        let transport = if dgram { Transport::Dgram } else { Transport::Stream };
        let encoded = encode(version, transport, source, destination);
        let header = encoded.as_bytes();
        let (source, destination) = match same_family(source.ip(), destination.ip()) {
            Pair::V4([s, d]) => (SocketAddr::new(s.into(), source.port()), SocketAddr::new(d.into(), destination.port())),
            Pair::V6([s, d]) => (SocketAddr::new(s.into(), source.port()), SocketAddr::new(d.into(), destination.port())),
        };
        let wire = [header, &tail[..]].concat();
        let Ok(Decoded::Done { header: got, consumed }) = decode(&wire, Accept::Any) else {
            panic!("{wire:?} did not decode");
        };
        prop_assert_eq!(consumed, header.len());
        let addresses = got.addresses.unwrap();
        prop_assert_eq!((addresses.source, addresses.destination), (source, destination));
        prop_assert_eq!(addresses.transport, transport);
        // Every strict prefix is a valid beginning.
        for n in 0..header.len() {
            prop_assert_eq!(decode(&header[..n], Accept::Any), Ok(Decoded::NeedMore), "prefix {}", n);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_a_done_header_is_within_bounds(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        v2_start in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if v2_start {
            bytes.splice(0..0, V2_SIGNATURE);
        }
        if let Ok(Decoded::Done { consumed, .. }) = decode(&bytes, Accept::Any) {
            prop_assert!(consumed <= bytes.len() && consumed <= MAX_V2_BYTES);
        }
    }
}
