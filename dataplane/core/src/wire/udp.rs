//! UDP headers (RFC 768). A zero checksum means "none" over IPv4 and is kept
//! zero across NAT rewrites.

use super::{Error, Field, Result, be16, set_be16};
use crate::checksum;

mod field {
    use super::Field;
    pub(super) const SRC_PORT: Field = 0..2;
    pub(super) const DST_PORT: Field = 2..4;
    pub(super) const LENGTH: Field = 4..6;
    pub(super) const CHECKSUM: Field = 6..8;
}

/// Header length.
pub const HEADER_LEN: usize = 8;

super::view! {
    #[inline(always)] =>
    /// A view of a UDP datagram.
    Packet
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks: 8 <= length field <= buffer length.
    #[inline(always)]
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let len = usize::from(be16(b, field::LENGTH));
        if len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if b.len() < len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Source port.
    #[inline(always)]
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    #[inline(always)]
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Length field (header and payload).
    #[inline(always)]
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// True if the length field says there is no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    /// Checksum field (0: none).
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Payload, up to the length field.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }

    /// True if the checksum is absent or verifies.
    #[inline]
    pub fn verify_checksum(&self, src: u32, dst: u32) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let b = &self.buffer.as_ref()[..usize::from(self.len())];
        let s = checksum::combine(
            checksum::pseudo_header_v4(src, dst, super::ipv4::protocol::UDP, self.len()),
            checksum::sum(b),
        );
        checksum::fold(s) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Rewrites the checksum field after a change of one 16-bit word, keeping
    /// "no checksum" as is and never producing 0 for a real checksum.
    #[inline(always)]
    fn patch16(&mut self, old: u16, new: u16) {
        let c = self.checksum();
        if c != 0 {
            let n = checksum::update16(c, old, new);
            set_be16(self.buffer.as_mut(), field::CHECKSUM, if n == 0 { 0xffff } else { n });
        }
    }

    /// Sets the source port, updating the checksum.
    #[inline(always)]
    pub fn set_src_port(&mut self, port: u16) {
        self.patch16(self.src_port(), port);
        set_be16(self.buffer.as_mut(), field::SRC_PORT, port);
    }

    /// Sets the destination port, updating the checksum.
    #[inline(always)]
    pub fn set_dst_port(&mut self, port: u16) {
        self.patch16(self.dst_port(), port);
        set_be16(self.buffer.as_mut(), field::DST_PORT, port);
    }

    /// Updates the checksum for a pseudo-header address change.
    #[inline(always)]
    pub fn update_checksum_for_addr(&mut self, old: u32, new: u32) {
        let c = self.checksum();
        if c != 0 {
            let n = checksum::update32(c, old, new);
            set_be16(self.buffer.as_mut(), field::CHECKSUM, if n == 0 { 0xffff } else { n });
        }
    }

    /// Writes a fresh checksum (0 is sent as 0xffff, RFC 768).
    pub fn fill_checksum(&mut self, src: u32, dst: u32) {
        let len = self.len();
        let b = self.buffer.as_mut();
        set_be16(b, field::CHECKSUM, 0);
        let s = checksum::combine(
            checksum::pseudo_header_v4(src, dst, super::ipv4::protocol::UDP, len),
            checksum::sum(&b[..usize::from(len)]),
        );
        let c = !checksum::fold(s);
        set_be16(b, field::CHECKSUM, if c == 0 { 0xffff } else { c });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(payload: &[u8]) -> Vec<u8> {
        let len = (HEADER_LEN + payload.len()) as u16;
        let mut v = vec![0xd4, 0x31, 0x14, 0xe9, (len >> 8) as u8, len as u8, 0, 0];
        v.extend_from_slice(payload);
        Packet::new_unchecked(&mut v[..]).fill_checksum(0xc612_0002, 0xc612_6401);
        v
    }

    #[test]
    fn parse_and_verify_with_etherparse() {
        let v = datagram(b"hello");
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.src_port(), 54321);
        assert_eq!(p.dst_port(), 5353);
        assert_eq!(p.len(), 13);
        assert_eq!(p.payload(), b"hello");
        assert!(p.verify_checksum(0xc612_0002, 0xc612_6401));
        let (h, _) = etherparse::UdpHeader::from_slice(&v).unwrap();
        assert_eq!(h.checksum, h.calc_checksum_ipv4_raw([198, 18, 0, 2], [198, 18, 100, 1], b"hello").unwrap());
    }

    #[test]
    fn zero_checksum_stays_zero() {
        let mut v = datagram(b"x");
        v[6] = 0;
        v[7] = 0;
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_dst_port(53);
        p.update_checksum_for_addr(1, 2);
        assert_eq!(p.checksum(), 0);
        assert!(p.verify_checksum(5, 6));
    }

    #[test]
    fn nat_rewrite_keeps_checksum_valid() {
        let mut v = datagram(b"payload!");
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_dst_port(9999);
        p.update_checksum_for_addr(0xc612_6401, 0xc612_010c);
        assert!(p.verify_checksum(0xc612_0002, 0xc612_010c));
    }

    #[test]
    fn rejects_bad_lengths() {
        let v = datagram(b"abc");
        assert_eq!(Packet::new_checked(&v[..7]).unwrap_err(), Error::Truncated);
        assert_eq!(Packet::new_checked(&v[..10]).unwrap_err(), Error::Truncated);
        let mut bad = v;
        bad[5] = 4;
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
    }
}
