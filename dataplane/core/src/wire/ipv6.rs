//! IPv6 headers (RFC 8200): the fixed 40-byte header and a bounded walk over
//! the extension headers that may follow it.
//!
//! `new_checked` validates the version and the payload length against the
//! buffer, so every accessor is in bounds afterwards, including
//! [`Packet::payload`], which ends at the payload length (Ethernet padding
//! is excluded). Jumbograms (payload length 0 with a Jumbo Payload option)
//! are not supported: a payload length of 0 is an empty payload.
//!
//! [`walk_extensions`] finds the upper-layer header behind hop-by-hop,
//! routing, destination options and fragment headers. It stops after at
//! most [`MAX_EXTENSION_HEADERS`] headers and [`MAX_EXTENSION_BYTES`] bytes,
//! so a crafted chain costs a bounded, small amount of work.

use super::{Error, EthernetAddress, Field, Result, be16, be32, set_be16, set_be32};

mod field {
    use super::Field;
    /// Version (4 bits), traffic class (8 bits) and flow label (20 bits).
    pub(super) const VER_TC_FLOW: Field = 0..4;
    pub(super) const PAYLOAD_LEN: Field = 4..6;
    pub(super) const NEXT_HEADER: usize = 6;
    pub(super) const HOP_LIMIT: usize = 7;
    pub(super) const SRC: Field = 8..24;
    pub(super) const DST: Field = 24..40;
}

/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;

/// Length of a fragment header (RFC 8200 section 4.5).
pub const FRAGMENT_HEADER_LEN: usize = 8;

/// Most extension headers [`walk_extensions`] follows before it gives up
/// with [`ExtError::TooMany`].
///
/// RFC 8200 section 4.1 recommends an order in which the headers this walk
/// understands appear at most five times (hop-by-hop, destination options,
/// routing, fragment, destination options again). Eight leaves room for a
/// sender that repeats one of them, which the RFC tolerates, while keeping
/// the worst case to eight short loop iterations per packet. A chain longer
/// than that is not seen from real stacks and is a known way to make
/// middleboxes spend time or miss the upper-layer header (RFC 7112, RFC 9098).
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// Most bytes of extension headers [`walk_extensions`] accepts before the
/// upper-layer header; past it the walk fails with [`ExtError::TooLong`].
///
/// 512 bytes covers a hop-by-hop header with options, destination options,
/// a fragment header and a segment routing header with 30 segments
/// (8 + 30 * 16 bytes), while the upper-layer header still lands in the first
/// 14 + 4 + 40 + 512 + 60 = 630 bytes of the frame, well within the first
/// segment of a DPDK mbuf, so the dataplane never has to follow a chain of
/// segments to find the ports.
pub const MAX_EXTENSION_BYTES: usize = 512;

/// IPv6 next-header values (IANA protocol numbers) that this module names.
pub mod next_header {
    /// Hop-by-hop options; only valid right after the fixed header.
    pub const HOP_BY_HOP: u8 = 0;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// Routing header.
    pub const ROUTING: u8 = 43;
    /// Fragment header.
    pub const FRAGMENT: u8 = 44;
    /// Encapsulating security payload.
    pub const ESP: u8 = 50;
    /// Authentication header.
    pub const AH: u8 = 51;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// No next header: nothing follows.
    pub const NO_NEXT_HEADER: u8 = 59;
    /// Destination options.
    pub const DEST_OPTIONS: u8 = 60;
    /// Mobility header (RFC 6275).
    pub const MOBILITY: u8 = 135;
    /// Host identity protocol (RFC 7401).
    pub const HIP: u8 = 139;
    /// Shim6 (RFC 5533).
    pub const SHIM6: u8 = 140;
}

super::view! {
    #[inline(always)] =>
    /// A view of an IPv6 packet.
    Packet
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks: buffer holds 40 bytes; version is 6; 40 + payload length <=
    /// buffer length.
    #[inline(always)]
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(Error::Malformed);
        }
        if b.len() - HEADER_LEN < usize::from(be16(b, field::PAYLOAD_LEN)) {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Consumes the view, giving back the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// IP version (6 once checked).
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[0] >> 4
    }

    /// Traffic class (DSCP and ECN).
    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        ((be32(self.buffer.as_ref(), field::VER_TC_FLOW) >> 20) & 0xff) as u8
    }

    /// Flow label (20 bits).
    #[inline(always)]
    pub fn flow_label(&self) -> u32 {
        be32(self.buffer.as_ref(), field::VER_TC_FLOW) & 0x000f_ffff
    }

    /// Payload length field: the bytes after the fixed header, extension
    /// headers included.
    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::PAYLOAD_LEN)
    }

    /// Total length: the fixed header and the payload.
    #[inline(always)]
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    /// Next header: the first extension header or the upper-layer protocol.
    #[inline(always)]
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NEXT_HEADER]
    }

    /// Hop limit.
    #[inline(always)]
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address, in network byte order.
    #[inline(always)]
    pub fn src_addr(&self) -> [u8; 16] {
        addr(self.buffer.as_ref(), field::SRC)
    }

    /// Destination address, in network byte order.
    #[inline(always)]
    pub fn dst_addr(&self) -> [u8; 16] {
        addr(self.buffer.as_ref(), field::DST)
    }

    /// Source address as an integer (host byte order, as
    /// `u128::from(Ipv6Addr)` gives it).
    #[inline(always)]
    pub fn src_addr_u128(&self) -> u128 {
        u128::from_be_bytes(self.src_addr())
    }

    /// Destination address as an integer (host byte order).
    #[inline(always)]
    pub fn dst_addr_u128(&self) -> u128 {
        u128::from_be_bytes(self.dst_addr())
    }

    /// The payload (extension headers and upper-layer message), up to the
    /// payload length.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.total_len()]
    }

    /// Walks the extension headers of this packet: see [`walk_extensions`].
    /// The offset in the result counts from the end of the fixed header,
    /// that is from the start of [`payload`](Self::payload).
    #[inline]
    pub fn upper_layer(&self) -> core::result::Result<L4Info, ExtError> {
        walk_extensions(self.next_header(), self.payload())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the traffic class, keeping version and flow label.
    #[inline]
    pub fn set_traffic_class(&mut self, tc: u8) {
        let b = self.buffer.as_mut();
        let w = be32(b, field::VER_TC_FLOW) & !0x0ff0_0000 | (u32::from(tc) << 20);
        set_be32(b, field::VER_TC_FLOW, w);
    }

    /// Sets the flow label (the low 20 bits of `label`), keeping version and
    /// traffic class.
    #[inline]
    pub fn set_flow_label(&mut self, label: u32) {
        let b = self.buffer.as_mut();
        let w = be32(b, field::VER_TC_FLOW) & 0xfff0_0000 | (label & 0x000f_ffff);
        set_be32(b, field::VER_TC_FLOW, w);
    }

    /// Sets the payload length field. The caller keeps it within the
    /// buffer; [`payload`](Self::payload) would panic otherwise.
    #[inline]
    pub fn set_payload_len(&mut self, len: u16) {
        set_be16(self.buffer.as_mut(), field::PAYLOAD_LEN, len);
    }

    /// Sets the next header.
    #[inline]
    pub fn set_next_header(&mut self, nh: u8) {
        self.buffer.as_mut()[field::NEXT_HEADER] = nh;
    }

    /// Sets the hop limit (IPv6 has no header checksum to update).
    #[inline(always)]
    pub fn set_hop_limit(&mut self, hops: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = hops;
    }

    /// Sets the source address. Upper-layer checksums cover it through the
    /// pseudo-header; see [`crate::checksum::update128`].
    #[inline(always)]
    pub fn set_src_addr(&mut self, a: &[u8; 16]) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(a);
    }

    /// Sets the destination address. Upper-layer checksums cover it through
    /// the pseudo-header; see [`crate::checksum::update128`].
    #[inline(always)]
    pub fn set_dst_addr(&mut self, a: &[u8; 16]) {
        self.buffer.as_mut()[field::DST].copy_from_slice(a);
    }

    /// Swaps source and destination addresses (upper-layer checksums are
    /// unchanged: the pseudo-header sum is the same).
    #[inline]
    pub fn swap_addrs(&mut self) {
        let (s, d) = (self.src_addr(), self.dst_addr());
        let b = self.buffer.as_mut();
        b[field::SRC].copy_from_slice(&d);
        b[field::DST].copy_from_slice(&s);
    }

    /// The payload, up to the payload length, mutably.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

#[inline(always)]
fn addr(b: &[u8], f: Field) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[f]);
    a
}

/// A fresh 40-byte fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Traffic class (DSCP and ECN).
    pub traffic_class: u8,
    /// Flow label (low 20 bits used).
    pub flow_label: u32,
    /// Payload length (everything after the fixed header).
    pub payload_len: u16,
    /// Next header.
    pub next_header: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
}

impl Header {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`].
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) {
        let b = &mut buf[..HEADER_LEN];
        let w = (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0x000f_ffff);
        set_be32(b, field::VER_TC_FLOW, w);
        set_be16(b, field::PAYLOAD_LEN, self.payload_len);
        b[field::NEXT_HEADER] = self.next_header;
        b[field::HOP_LIMIT] = self.hop_limit;
        b[field::SRC].copy_from_slice(&self.src);
        b[field::DST].copy_from_slice(&self.dst);
    }
}

/// The solicited-node multicast address of `addr` (RFC 4291 section 2.7.1):
/// ff02::1:ff00:0/104 with the low 24 bits of `addr`. Neighbour
/// solicitations for `addr` are sent there.
#[inline]
pub fn solicited_node_multicast(addr: &[u8; 16]) -> [u8; 16] {
    [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, addr[13], addr[14], addr[15]]
}

/// The Ethernet multicast address for an IPv6 multicast destination
/// (RFC 2464 section 7): 33:33 followed by the low 32 bits of `addr`.
#[inline]
pub fn multicast_mac(addr: &[u8; 16]) -> EthernetAddress {
    EthernetAddress([0x33, 0x33, addr[12], addr[13], addr[14], addr[15]])
}

/// What a fragment header says (RFC 8200 section 4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentInfo {
    /// Fragment offset in 8-byte units (0 for the first fragment).
    pub offset: u16,
    /// More-fragments flag.
    pub more: bool,
    /// Identification.
    pub ident: u32,
}

impl FragmentInfo {
    /// True if this is an atomic fragment (offset 0, no more fragments):
    /// a whole packet that merely carries a fragment header (RFC 6946).
    #[inline]
    pub fn is_atomic(&self) -> bool {
        self.offset == 0 && !self.more
    }
}

/// Where the upper-layer message of an IPv6 packet starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Info {
    /// Upper-layer protocol (e.g. [`next_header::TCP`]). Any value other
    /// than the extension headers the walk knows; the caller decides
    /// whether it handles it.
    pub protocol: u8,
    /// Offset of the upper-layer header from the end of the fixed header
    /// (the length of the extension headers).
    pub offset: usize,
    /// The fragment header, if one was seen. When its offset is not zero the
    /// bytes at `offset` are the middle of a fragmented payload, not an
    /// upper-layer header, and `protocol` is the fragment header's next
    /// header as written (it may name an extension header).
    pub fragment: Option<FragmentInfo>,
}

/// Why [`walk_extensions`] found no usable upper-layer header. Every variant
/// means the packet should be dropped as malformed or unsupported; they are
/// distinct so that a counter can tell them apart.
///
/// A first fragment whose header chain continues into a later fragment
/// fails with [`ExtError::Truncated`]; RFC 7112 requires the whole chain in
/// the first fragment, so it is dropped like any other truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtError {
    /// An extension header runs past the end of the payload.
    #[error("extension header truncated")]
    Truncated,
    /// More than [`MAX_EXTENSION_HEADERS`] extension headers.
    #[error("too many extension headers")]
    TooMany,
    /// The extension headers are longer than [`MAX_EXTENSION_BYTES`].
    #[error("extension headers too long")]
    TooLong,
    /// A hop-by-hop header that is not the first header (RFC 8200 section
    /// 4.3 only allows it right after the fixed header).
    #[error("hop-by-hop header not first")]
    HopByHopNotFirst,
    /// A second fragment header in the unfragmentable part.
    #[error("repeated fragment header")]
    RepeatedFragment,
    /// "No next header" (59): the packet carries no upper-layer message.
    #[error("no next header")]
    NoNextHeader,
    /// A header this walk does not parse: AH, ESP, mobility, HIP or shim6.
    /// Their contents are opaque or need state, so no ports can be found.
    #[error("unsupported extension header {0}")]
    Unsupported(u8),
}

impl From<ExtError> for Error {
    /// [`ExtError::Truncated`] is [`Error::Truncated`]; anything else is
    /// [`Error::Malformed`].
    fn from(e: ExtError) -> Error {
        match e {
            ExtError::Truncated => Error::Truncated,
            _ => Error::Malformed,
        }
    }
}

/// Follows the extension headers starting with `first` (the fixed header's
/// next header) over `bytes` (the IPv6 payload) to the upper-layer header.
///
/// Walks hop-by-hop (first only), routing, destination options and fragment
/// headers. Returns the first other next-header value as the upper-layer
/// protocol, with its offset into `bytes`. A fragment header with a non-zero
/// offset ends the walk: what follows it is not a header. Fails on
/// truncation, on more than [`MAX_EXTENSION_HEADERS`] headers or
/// [`MAX_EXTENSION_BYTES`] bytes, on a misplaced hop-by-hop header, a second
/// fragment header, "no next header", and the headers in
/// [`ExtError::Unsupported`]. At most `MAX_EXTENSION_HEADERS + 1` iterations
/// run, whatever the input.
#[inline]
pub fn walk_extensions(first: u8, bytes: &[u8]) -> core::result::Result<L4Info, ExtError> {
    use next_header as nh;
    let mut next = first;
    let mut off = 0usize;
    let mut fragment: Option<FragmentInfo> = None;
    for count in 0..=MAX_EXTENSION_HEADERS {
        let len = match next {
            nh::HOP_BY_HOP | nh::ROUTING | nh::DEST_OPTIONS => {
                if next == nh::HOP_BY_HOP && count != 0 {
                    return Err(ExtError::HopByHopNotFirst);
                }
                // Hdr Ext Len: 8-octet units, not counting the first 8.
                match bytes.get(off..off + 2) {
                    Some(&[_, units]) => (usize::from(units) + 1) * 8,
                    _ => return Err(ExtError::Truncated),
                }
            }
            nh::FRAGMENT => {
                if fragment.is_some() {
                    return Err(ExtError::RepeatedFragment);
                }
                FRAGMENT_HEADER_LEN
            }
            nh::NO_NEXT_HEADER => return Err(ExtError::NoNextHeader),
            nh::ESP | nh::AH | nh::MOBILITY | nh::HIP | nh::SHIM6 => return Err(ExtError::Unsupported(next)),
            protocol => return Ok(L4Info { protocol, offset: off, fragment }),
        };
        if count == MAX_EXTENSION_HEADERS {
            return Err(ExtError::TooMany);
        }
        let end = off + len;
        if end > MAX_EXTENSION_BYTES {
            return Err(ExtError::TooLong);
        }
        let Some(h) = bytes.get(off..end) else {
            return Err(ExtError::Truncated);
        };
        off = end;
        if next == nh::FRAGMENT {
            // `h` is exactly FRAGMENT_HEADER_LEN bytes here.
            let o = u16::from_be_bytes([h[2], h[3]]);
            let f =
                FragmentInfo { offset: o >> 3, more: o & 1 != 0, ident: u32::from_be_bytes([h[4], h[5], h[6], h[7]]) };
            fragment = Some(f);
            if f.offset != 0 {
                return Ok(L4Info { protocol: h[0], offset: off, fragment });
            }
        }
        next = h[0];
    }
    // Not reached: the last iteration returns above.
    Err(ExtError::TooMany)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpNumber, Ipv6FragmentHeader, Ipv6RawExtHeader};

    // 2001:db8::1 and 2001:db8:0:1::2.
    const SRC: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];

    /// An IPv6 packet built by etherparse: `exts` as raw bytes after the
    /// fixed header, then `l4` bytes.
    fn packet(first: u8, exts: &[u8], l4: &[u8]) -> Vec<u8> {
        let h = etherparse::Ipv6Header {
            traffic_class: 0xb8,
            flow_label: etherparse::Ipv6FlowLabel::try_new(0x1_2345).unwrap(),
            payload_length: (exts.len() + l4.len()) as u16,
            next_header: IpNumber(first),
            hop_limit: 64,
            source: SRC,
            destination: DST,
        };
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(exts);
        v.extend_from_slice(l4);
        v
    }

    /// An options-style extension header (hop-by-hop, routing, destination
    /// options) of `8 * (units + 1)` bytes, written by etherparse.
    fn raw_ext(next: u8, units: u8) -> Vec<u8> {
        let payload = vec![0u8; usize::from(units) * 8 + 6];
        Ipv6RawExtHeader::new_raw(IpNumber(next), &payload).unwrap().to_bytes().to_vec()
    }

    fn frag_ext(next: u8, offset: u16, more: bool, ident: u32) -> Vec<u8> {
        let f =
            Ipv6FragmentHeader::new(IpNumber(next), etherparse::IpFragOffset::try_new(offset).unwrap(), more, ident);
        f.to_bytes().to_vec()
    }

    fn tcp_bytes() -> Vec<u8> {
        etherparse::TcpHeader::new(40000, 443, 1, 1024).to_bytes().to_vec()
    }

    #[test]
    fn parse_matches_etherparse() {
        let v = packet(next_header::TCP, &[], &tcp_bytes());
        let p = Packet::new_checked(&v[..]).unwrap();
        let e = etherparse::Ipv6HeaderSlice::from_slice(&v).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), e.traffic_class());
        assert_eq!(p.traffic_class(), 0xb8);
        assert_eq!(p.flow_label(), e.flow_label().value());
        assert_eq!(p.flow_label(), 0x1_2345);
        assert_eq!(p.payload_len(), e.payload_length());
        assert_eq!(p.total_len(), 60);
        assert_eq!(p.next_header(), e.next_header().0);
        assert_eq!(p.hop_limit(), e.hop_limit());
        assert_eq!(p.src_addr(), e.source());
        assert_eq!(p.dst_addr(), e.destination());
        assert_eq!(p.src_addr_u128(), u128::from(e.source_addr()));
        assert_eq!(p.dst_addr_u128(), u128::from(e.destination_addr()));
        assert_eq!(p.payload(), &v[40..]);
        assert_eq!(p.upper_layer(), Ok(L4Info { protocol: next_header::TCP, offset: 0, fragment: None }));
    }

    #[test]
    fn payload_excludes_ethernet_padding() {
        let mut v = packet(next_header::UDP, &[], &[0u8; 8]);
        v.extend_from_slice(&[0xee; 10]);
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn rejects_bad_lengths_and_version() {
        let v = packet(next_header::TCP, &[], &tcp_bytes());
        // Truncation at every byte.
        for n in 0..v.len() {
            assert_eq!(Packet::new_checked(&v[..n]).unwrap_err(), Error::Truncated, "len {n}");
        }
        for ver in [0u8, 4, 5, 7, 15] {
            let mut bad = v.clone();
            bad[0] = (ver << 4) | (bad[0] & 0x0f);
            assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
        }
        // Payload length that claims one byte more than there is.
        let mut bad = v.clone();
        bad[4..6].copy_from_slice(&21u16.to_be_bytes());
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Truncated);
        let mut bad = v;
        bad[4..6].copy_from_slice(&0xffffu16.to_be_bytes());
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn setters_round_trip() {
        let mut v = packet(next_header::TCP, &[], &tcp_bytes());
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_traffic_class(0x2e);
        p.set_flow_label(0xf_ffff);
        p.set_hop_limit(1);
        p.set_next_header(next_header::UDP);
        p.set_payload_len(8);
        p.set_src_addr(&DST);
        p.set_dst_addr(&SRC);
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0x2e);
        assert_eq!(p.flow_label(), 0xf_ffff);
        p.set_flow_label(0xfff0_0001);
        assert_eq!(p.flow_label(), 1);
        assert_eq!(p.traffic_class(), 0x2e);
        p.swap_addrs();
        assert_eq!(p.payload_mut().len(), 8);
        let e = etherparse::Ipv6HeaderSlice::from_slice(&v).unwrap();
        assert_eq!(e.version(), 6);
        assert_eq!(e.traffic_class(), 0x2e);
        assert_eq!(e.flow_label().value(), 1);
        assert_eq!(e.hop_limit(), 1);
        assert_eq!(e.next_header(), IpNumber::UDP);
        assert_eq!(e.payload_length(), 8);
        assert_eq!(e.source(), SRC);
        assert_eq!(e.destination(), DST);
    }

    #[test]
    fn header_emit_matches_etherparse() {
        let h = Header {
            traffic_class: 0x11,
            flow_label: 0xa_bcde,
            payload_len: 32,
            next_header: next_header::ICMPV6,
            hop_limit: 255,
            src: SRC,
            dst: DST,
        };
        let mut b = [0u8; 40];
        h.emit(&mut b);
        let want = etherparse::Ipv6Header {
            traffic_class: 0x11,
            flow_label: etherparse::Ipv6FlowLabel::try_new(0xa_bcde).unwrap(),
            payload_length: 32,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: 255,
            source: SRC,
            destination: DST,
        };
        assert_eq!(b, want.to_bytes());
    }

    #[test]
    fn multicast_helpers() {
        let target = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 0xcd, 0xef, 0x12];
        let m = solicited_node_multicast(&target);
        assert_eq!(core::net::Ipv6Addr::from(m), "ff02::1:ffcd:ef12".parse::<core::net::Ipv6Addr>().unwrap());
        assert_eq!(multicast_mac(&m), EthernetAddress([0x33, 0x33, 0xff, 0xcd, 0xef, 0x12]));
    }

    /// Checks our walk against etherparse's for a packet etherparse accepts.
    fn agree(v: &[u8]) -> L4Info {
        let p = Packet::new_checked(v).unwrap();
        let ours = p.upper_layer().unwrap();
        let e = etherparse::Ipv6Slice::from_slice(v).unwrap();
        assert_eq!(ours.protocol, e.payload().ip_number.0);
        assert_eq!(ours.offset, e.extensions().slice().len());
        assert_eq!(ours.fragment.is_some_and(|f| !f.is_atomic()), e.is_payload_fragmented());
        ours
    }

    #[test]
    fn walk_recommended_chain() {
        use next_header as nh;
        let mut exts = raw_ext(nh::DEST_OPTIONS, 0);
        exts.extend(raw_ext(nh::ROUTING, 1));
        exts.extend(raw_ext(nh::FRAGMENT, 2));
        exts.extend(frag_ext(nh::DEST_OPTIONS, 0, true, 0xdead_beef));
        exts.extend(raw_ext(nh::TCP, 0));
        let v = packet(nh::HOP_BY_HOP, &exts, &tcp_bytes());
        let l4 = agree(&v);
        assert_eq!(l4.protocol, nh::TCP);
        assert_eq!(l4.offset, 8 + 16 + 24 + 8 + 8);
        assert_eq!(l4.fragment, Some(FragmentInfo { offset: 0, more: true, ident: 0xdead_beef }));
    }

    #[test]
    fn walk_single_headers() {
        use next_header as nh;
        for first in [nh::HOP_BY_HOP, nh::ROUTING, nh::DEST_OPTIONS] {
            let v = packet(first, &raw_ext(nh::UDP, 3), &[0u8; 8]);
            let l4 = agree(&v);
            assert_eq!((l4.protocol, l4.offset, l4.fragment), (nh::UDP, 32, None));
        }
        // ICMPv6 and an unknown upper layer are both "upper layer".
        let v = packet(nh::ICMPV6, &[], &[128, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(agree(&v).protocol, nh::ICMPV6);
        assert_eq!(walk_extensions(47, &[]), Ok(L4Info { protocol: 47, offset: 0, fragment: None }));
    }

    #[test]
    fn walk_fragments() {
        use next_header as nh;
        // Atomic fragment.
        let v = packet(nh::FRAGMENT, &frag_ext(nh::UDP, 0, false, 7), &[0u8; 8]);
        let l4 = agree(&v);
        assert_eq!(l4.offset, 8);
        assert!(l4.fragment.unwrap().is_atomic());
        // A later fragment: the walk stops at the fragment header, even if
        // its next header names another extension header.
        let exts = frag_ext(nh::DEST_OPTIONS, 185, true, 0x0102_0304);
        let v = packet(nh::HOP_BY_HOP, &[raw_ext(nh::FRAGMENT, 0), exts].concat(), &[0xff; 16]);
        let l4 = Packet::new_checked(&v[..]).unwrap().upper_layer().unwrap();
        assert_eq!(l4.protocol, nh::DEST_OPTIONS);
        assert_eq!(l4.offset, 16);
        assert_eq!(l4.fragment, Some(FragmentInfo { offset: 185, more: true, ident: 0x0102_0304 }));
        // etherparse would go on parsing the fragment data as headers; check
        // the fragment header fields with its fragment header parser.
        let e = etherparse::Ipv6FragmentHeaderSlice::from_slice(&v[48..]).unwrap();
        assert_eq!(e.fragment_offset().value(), 185);
        assert!(e.more_fragments());
        assert_eq!(e.identification(), 0x0102_0304);
        assert_eq!(e.next_header().0, l4.protocol);
        // Two fragment headers in a first fragment.
        let exts = [frag_ext(nh::FRAGMENT, 0, true, 1), frag_ext(nh::UDP, 0, true, 1)].concat();
        assert_eq!(walk_extensions(nh::FRAGMENT, &exts), Err(ExtError::RepeatedFragment));
    }

    #[test]
    fn walk_errors() {
        use next_header as nh;
        // Hop-by-hop not first.
        let exts = [raw_ext(nh::HOP_BY_HOP, 0), raw_ext(nh::TCP, 0)].concat();
        assert_eq!(walk_extensions(nh::DEST_OPTIONS, &exts), Err(ExtError::HopByHopNotFirst));
        let v = packet(nh::DEST_OPTIONS, &exts, &tcp_bytes());
        assert!(etherparse::Ipv6Slice::from_slice(&v).is_err());
        // No next header, directly and after an extension.
        assert_eq!(walk_extensions(nh::NO_NEXT_HEADER, &[]), Err(ExtError::NoNextHeader));
        assert_eq!(walk_extensions(nh::ROUTING, &raw_ext(nh::NO_NEXT_HEADER, 0)), Err(ExtError::NoNextHeader));
        for u in [nh::ESP, nh::AH, nh::MOBILITY, nh::HIP, nh::SHIM6] {
            assert_eq!(walk_extensions(u, &[0u8; 64]), Err(ExtError::Unsupported(u)));
            let exts = raw_ext(u, 0);
            assert_eq!(walk_extensions(nh::HOP_BY_HOP, &exts), Err(ExtError::Unsupported(u)));
        }
        assert_eq!(Error::from(ExtError::Truncated), Error::Truncated);
        assert_eq!(Error::from(ExtError::TooMany), Error::Malformed);
    }

    #[test]
    fn walk_truncated_at_every_byte() {
        use next_header as nh;
        let exts = [raw_ext(nh::ROUTING, 1), raw_ext(nh::FRAGMENT, 0), frag_ext(nh::TCP, 0, false, 9)].concat();
        assert_eq!(walk_extensions(nh::HOP_BY_HOP, &exts).unwrap().offset, exts.len());
        for n in 0..exts.len() {
            assert_eq!(walk_extensions(nh::HOP_BY_HOP, &exts[..n]), Err(ExtError::Truncated), "len {n}");
        }
        // The payload length cuts the chain short while the buffer holds it.
        let mut v = packet(nh::HOP_BY_HOP, &exts, &[]);
        v[4..6].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(Packet::new_checked(&v[..]).unwrap().upper_layer(), Err(ExtError::Truncated));
    }

    /// `n` destination-options headers of 8 bytes each, then TCP.
    fn dest_chain(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| raw_ext(if i + 1 == n { next_header::TCP } else { next_header::DEST_OPTIONS }, 0)).collect()
    }

    #[test]
    fn walk_bounds() {
        use next_header as nh;
        // Exactly the maximum number of headers is fine.
        let exts = dest_chain(MAX_EXTENSION_HEADERS);
        let l4 = walk_extensions(nh::DEST_OPTIONS, &exts).unwrap();
        assert_eq!((l4.protocol, l4.offset), (nh::TCP, 8 * MAX_EXTENSION_HEADERS));
        // One more is too many.
        let exts = dest_chain(MAX_EXTENSION_HEADERS + 1);
        assert_eq!(walk_extensions(nh::DEST_OPTIONS, &exts), Err(ExtError::TooMany));
        // A chain of 40 headers: too many, not truncated or looping.
        let exts = dest_chain(40);
        assert_eq!(walk_extensions(nh::DEST_OPTIONS, &exts), Err(ExtError::TooMany));
        let v = packet(nh::HOP_BY_HOP, &[raw_ext(nh::DEST_OPTIONS, 0), exts].concat(), &tcp_bytes());
        assert_eq!(Packet::new_checked(&v[..]).unwrap().upper_layer(), Err(ExtError::TooMany));
        // 40 hop-by-hop headers: only the first may be hop-by-hop.
        let hbh: Vec<u8> = (0..40).flat_map(|_| raw_ext(nh::HOP_BY_HOP, 0)).collect();
        assert_eq!(walk_extensions(nh::HOP_BY_HOP, &hbh), Err(ExtError::HopByHopNotFirst));
        // Exactly MAX_EXTENSION_BYTES is fine; one 8-byte unit more is not.
        let units = (MAX_EXTENSION_BYTES / 8 - 1) as u8;
        let exts = raw_ext(nh::UDP, units);
        assert_eq!(exts.len(), MAX_EXTENSION_BYTES);
        assert_eq!(walk_extensions(nh::DEST_OPTIONS, &exts).unwrap().offset, MAX_EXTENSION_BYTES);
        let exts = raw_ext(nh::UDP, units + 1);
        assert_eq!(walk_extensions(nh::DEST_OPTIONS, &exts), Err(ExtError::TooLong));
        // Also over several headers, and before the buffer is even read.
        let exts = [raw_ext(nh::ROUTING, 31), raw_ext(nh::UDP, 32)].concat();
        assert_eq!(walk_extensions(nh::HOP_BY_HOP, &exts), Err(ExtError::TooLong));
        assert_eq!(walk_extensions(nh::HOP_BY_HOP, &[nh::UDP, 255]), Err(ExtError::TooLong));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.version(), p.traffic_class(), p.flow_label(), p.hop_limit());
                let _ = (p.src_addr(), p.dst_addr(), p.src_addr_u128(), p.dst_addr_u128());
                proptest::prop_assert!(p.payload().len() <= data.len() - HEADER_LEN);
                if let Ok(l4) = p.upper_layer() {
                    proptest::prop_assert!(l4.offset <= p.payload().len());
                }
            }
        }

        #[test]
        fn arbitrary_headers_never_panic(
            mut data in proptest::collection::vec(proptest::num::u8::ANY, 40..400),
            low in 0u8..16,
            claimed in proptest::num::u16::ANY,
        ) {
            // Version 6 and a payload length that mostly fits, so that the
            // view and the walk run on most cases rather than few.
            data[0] = 0x60 | low;
            let room = data.len() - HEADER_LEN;
            let plen = if claimed & 1 == 0 { usize::from(claimed) % (room + 1) } else { usize::from(claimed) };
            data[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
            match Packet::new_checked(&data[..]) {
                Ok(p) => {
                    proptest::prop_assert!(plen <= room);
                    proptest::prop_assert_eq!(p.payload().len(), plen);
                    if let Ok(l4) = p.upper_layer() {
                        proptest::prop_assert!(l4.offset <= plen.min(MAX_EXTENSION_BYTES));
                    }
                }
                Err(e) => {
                    proptest::prop_assert!(plen > room);
                    proptest::prop_assert_eq!(e, Error::Truncated);
                }
            }
        }

        #[test]
        fn walk_terminates_within_bounds(
            first in proptest::num::u8::ANY,
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..700),
        ) {
            if let Ok(l4) = walk_extensions(first, &data) {
                proptest::prop_assert!(l4.offset <= data.len());
                proptest::prop_assert!(l4.offset <= MAX_EXTENSION_BYTES);
            }
        }

        #[test]
        fn walk_terminates_on_chains(
            first in proptest::sample::select(vec![0u8, 43, 44, 60]),
            // Mostly extension-header numbers and short lengths, so deep chains occur.
            hdrs in proptest::collection::vec(
                (proptest::sample::select(vec![0u8, 6, 17, 43, 44, 50, 58, 59, 60]), 0u8..4, proptest::num::u16::ANY),
                0..20,
            ),
        ) {
            let mut data = Vec::new();
            for (next, units, frag) in &hdrs {
                let start = data.len();
                data.resize(start + usize::from(*units + 1) * 8, 0);
                data[start] = *next;
                data[start + 1] = *units;
                data[start + 2..start + 4].copy_from_slice(&frag.to_be_bytes());
            }
            // Returning at all is the property; an Ok must point inside the bounds.
            if let Ok(l4) = walk_extensions(first, &data) {
                proptest::prop_assert!(l4.offset <= data.len().min(MAX_EXTENSION_BYTES));
            }
        }
    }
}
