//! IPv4 headers (RFC 791).
//!
//! `new_checked` validates version, header length and total length against
//! the buffer, so every accessor is in bounds afterwards, including
//! [`Packet::payload`] which ends at the total length (Ethernet padding is
//! excluded). The setters used for NAT keep the header checksum right with
//! RFC 1624 incremental updates.

use super::{Error, Field, Result, be16, be32, set_be16, set_be32};
use crate::checksum;

mod field {
    use super::Field;
    pub(super) const VER_IHL: usize = 0;
    pub(super) const TOS: usize = 1;
    pub(super) const TOTAL_LEN: Field = 2..4;
    pub(super) const IDENT: Field = 4..6;
    pub(super) const FLAGS_FRAG: Field = 6..8;
    pub(super) const TTL: usize = 8;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const CHECKSUM: Field = 10..12;
    pub(super) const SRC: Field = 12..16;
    pub(super) const DST: Field = 16..20;
    /// TTL and protocol share one 16-bit checksum word.
    pub(super) const TTL_PROTO: Field = 8..10;
}

/// Minimum header length.
pub const MIN_HEADER_LEN: usize = 20;

/// IP protocol numbers.
pub mod protocol {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// IP in IP.
    pub const IPIP: u8 = 4;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

super::view! {
    #[inline(always)] =>
    /// A view of an IPv4 packet.
    Packet
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks: buffer holds 20 bytes; version is 4; 20 <= header length <=
    /// total length <= buffer length.
    #[inline(always)]
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(Error::Malformed);
        }
        let hl = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        let total = usize::from(be16(b, field::TOTAL_LEN));
        if hl < MIN_HEADER_LEN || total < hl {
            return Err(Error::Malformed);
        }
        if b.len() < total {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Header length in bytes (including options).
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// Type of service / DSCP+ECN byte.
    #[inline(always)]
    pub fn tos(&self) -> u8 {
        self.buffer.as_ref()[field::TOS]
    }

    /// Total length field.
    #[inline(always)]
    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::TOTAL_LEN)
    }

    /// Identification.
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Don't-fragment flag.
    #[inline(always)]
    pub fn dont_frag(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLAGS_FRAG) & 0x4000 != 0
    }

    /// True if this is a fragment (more-fragments set or a non-zero offset).
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLAGS_FRAG) & 0x3fff != 0
    }

    /// Fragment offset, in 8-byte units (0 for the first fragment or an
    /// unfragmented packet).
    #[inline(always)]
    pub fn frag_offset(&self) -> u16 {
        be16(self.buffer.as_ref(), field::FLAGS_FRAG) & 0x1fff
    }

    /// More-fragments flag.
    #[inline(always)]
    pub fn more_frags(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLAGS_FRAG) & 0x2000 != 0
    }

    /// Time to live.
    #[inline(always)]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// Protocol of the payload.
    #[inline(always)]
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// Header checksum field.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Source address (host byte order).
    #[inline(always)]
    pub fn src_addr(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SRC)
    }

    /// Destination address (host byte order).
    #[inline(always)]
    pub fn dst_addr(&self) -> u32 {
        be32(self.buffer.as_ref(), field::DST)
    }

    /// True if the header checksum verifies.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(&self.buffer.as_ref()[..self.header_len()])) == 0xffff
    }

    /// The payload, up to the total length.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        &b[self.header_len()..usize::from(self.total_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source address, updating the header checksum.
    #[inline(always)]
    pub fn set_src_addr(&mut self, addr: u32) {
        let old = self.src_addr();
        let c = checksum::update32(self.checksum(), old, addr);
        let b = self.buffer.as_mut();
        set_be32(b, field::SRC, addr);
        set_be16(b, field::CHECKSUM, c);
    }

    /// Sets the destination address, updating the header checksum.
    #[inline(always)]
    pub fn set_dst_addr(&mut self, addr: u32) {
        let old = self.dst_addr();
        let c = checksum::update32(self.checksum(), old, addr);
        let b = self.buffer.as_mut();
        set_be32(b, field::DST, addr);
        set_be16(b, field::CHECKSUM, c);
    }

    /// Sets the TTL, updating the header checksum.
    #[inline(always)]
    pub fn set_ttl(&mut self, ttl: u8) {
        let b = self.buffer.as_mut();
        let old = be16(b, field::TTL_PROTO);
        b[field::TTL] = ttl;
        let new = be16(b, field::TTL_PROTO);
        let c = checksum::update16(be16(b, field::CHECKSUM), old, new);
        set_be16(b, field::CHECKSUM, c);
    }

    /// Writes a fresh header checksum over the whole header.
    pub fn fill_checksum(&mut self) {
        let hl = self.header_len();
        let b = self.buffer.as_mut();
        set_be16(b, field::CHECKSUM, 0);
        let c = checksum::checksum(&b[..hl]);
        set_be16(b, field::CHECKSUM, c);
    }

    /// Swaps source and destination addresses (checksum is unchanged: the
    /// sum of the header words is the same).
    #[inline]
    pub fn swap_addrs(&mut self) {
        let (s, d) = (self.src_addr(), self.dst_addr());
        let b = self.buffer.as_mut();
        set_be32(b, field::SRC, d);
        set_be32(b, field::DST, s);
    }

    /// The payload, up to the total length, mutably.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, total) = (self.header_len(), usize::from(self.total_len()));
        &mut self.buffer.as_mut()[hl..total]
    }
}

/// A fresh 20-byte header: no options, identification 0, the given DF
/// flag, checksum filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Type of service (DSCP and ECN).
    pub tos: u8,
    /// Total length, header included.
    pub total_len: u16,
    /// Don't-fragment flag.
    pub dont_frag: bool,
    /// Time to live.
    pub ttl: u8,
    /// Payload protocol.
    pub protocol: u8,
    /// Source address.
    pub src: u32,
    /// Destination address.
    pub dst: u32,
}

impl Header {
    /// Writes the header into the first [`MIN_HEADER_LEN`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`MIN_HEADER_LEN`].
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) {
        let b = &mut buf[..MIN_HEADER_LEN];
        b[field::VER_IHL] = 0x45;
        b[field::TOS] = self.tos;
        set_be16(b, field::TOTAL_LEN, self.total_len);
        set_be16(b, field::IDENT, 0);
        set_be16(b, field::FLAGS_FRAG, if self.dont_frag { 0x4000 } else { 0 });
        b[field::TTL] = self.ttl;
        b[field::PROTOCOL] = self.protocol;
        set_be32(b, field::SRC, self.src);
        set_be32(b, field::DST, self.dst);
        set_be16(b, field::CHECKSUM, 0);
        let c = checksum::checksum(b);
        set_be16(b, field::CHECKSUM, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 198.18.0.2 -> 198.18.100.1, TCP, TTL 64, total length 40 (header + 20).
    fn fixture() -> Vec<u8> {
        let mut v = vec![
            0x45, 0x00, 0x00, 0x28, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 198, 18, 0, 2, 198, 18, 100, 1,
        ];
        v.extend_from_slice(&[0u8; 20]);
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.fill_checksum();
        v
    }

    #[test]
    fn parse() {
        let v = fixture();
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 40);
        assert_eq!(p.ident(), 0x1234);
        assert!(p.dont_frag());
        assert!(!p.is_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), protocol::TCP);
        assert_eq!(p.src_addr(), 0xc612_0002);
        assert_eq!(p.dst_addr(), 0xc612_6401);
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 20);
        // Independent check of the checksum we wrote.
        let (h, _) = etherparse::Ipv4Header::from_slice(&v).unwrap();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
    }

    #[test]
    fn payload_excludes_ethernet_padding() {
        let mut v = fixture();
        v.extend_from_slice(&[0xee; 6]);
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.payload().len(), 20);
    }

    #[test]
    fn rejects_bad_lengths() {
        let v = fixture();
        assert_eq!(Packet::new_checked(&v[..19]).unwrap_err(), Error::Truncated);
        assert_eq!(Packet::new_checked(&v[..39]).unwrap_err(), Error::Truncated);
        let mut bad = v.clone();
        bad[0] = 0x44; // IHL 16 bytes
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
        let mut bad = v.clone();
        bad[0] = 0x65; // version 6
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
        let mut bad = v.clone();
        bad[2] = 0;
        bad[3] = 19; // total length below header length
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
        let mut bad = v;
        bad[0] = 0x4f; // 60-byte header in a 40-byte packet
        assert!(Packet::new_checked(&bad[..]).is_err());
    }

    #[test]
    fn rewrites_keep_checksum_valid() {
        let mut v = fixture();
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_dst_addr(0xc612_010b);
        p.set_src_addr(0xc612_0003);
        p.set_ttl(63);
        assert!(p.verify_checksum());
        p.swap_addrs();
        assert!(p.verify_checksum());
        let (h, _) = etherparse::Ipv4Header::from_slice(&v).unwrap();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(h.time_to_live, 63);
        assert_eq!(h.source, [198, 18, 1, 11]);
        assert_eq!(h.destination, [198, 18, 0, 3]);
    }

    #[test]
    fn fragments() {
        let mut v = fixture();
        v[6] = 0x20; // MF
        v[7] = 0x00;
        assert!(Packet::new_unchecked(&v[..]).is_fragment());
        v[6] = 0x00;
        v[7] = 0x10; // offset 16
        assert!(Packet::new_unchecked(&v[..]).is_fragment());
    }
}
