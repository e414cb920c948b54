//! TCP headers (RFC 9293), as far as a load balancer needs them: ports,
//! flags and a checksum kept right across NAT rewrites.

use super::{Error, Field, Result, be16, set_be16};
use crate::checksum;

mod field {
    use super::Field;
    pub(super) const SRC_PORT: Field = 0..2;
    pub(super) const DST_PORT: Field = 2..4;
    pub(super) const SEQ: Field = 4..8;
    pub(super) const ACK: Field = 8..12;
    pub(super) const OFF_FLAGS: Field = 12..14;
    pub(super) const WINDOW: Field = 14..16;
    pub(super) const CHECKSUM: Field = 16..18;
}

/// Minimum header length.
pub const MIN_HEADER_LEN: usize = 20;

/// TCP flag bits.
pub mod flags {
    /// FIN.
    pub const FIN: u16 = 0x001;
    /// SYN.
    pub const SYN: u16 = 0x002;
    /// RST.
    pub const RST: u16 = 0x004;
    /// PSH.
    pub const PSH: u16 = 0x008;
    /// ACK.
    pub const ACK: u16 = 0x010;
}

super::view! {
    #[inline(always)] =>
    /// A view of a TCP segment.
    Packet
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks the buffer holds the fixed header and the data offset is sane.
    #[inline(always)]
    pub fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        let off = self.header_len();
        if off < MIN_HEADER_LEN {
            return Err(Error::Malformed);
        }
        if b.len() < off {
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

    /// Sequence number.
    pub fn seq(&self) -> u32 {
        super::be32(self.buffer.as_ref(), field::SEQ)
    }

    /// Acknowledgement number.
    pub fn ack(&self) -> u32 {
        super::be32(self.buffer.as_ref(), field::ACK)
    }

    /// Header length from the data offset, in bytes.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::OFF_FLAGS.start] >> 4) * 4
    }

    /// Flag bits (see [`flags`]).
    #[inline(always)]
    pub fn flags(&self) -> u16 {
        be16(self.buffer.as_ref(), field::OFF_FLAGS) & 0x01ff
    }

    /// Receive window.
    pub fn window(&self) -> u16 {
        be16(self.buffer.as_ref(), field::WINDOW)
    }

    /// Checksum field.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// True if the checksum verifies for the given pseudo-header addresses.
    /// The buffer must be exactly the segment (IP payload).
    #[inline]
    pub fn verify_checksum(&self, src: u32, dst: u32) -> bool {
        let b = self.buffer.as_ref();
        let Ok(len) = u16::try_from(b.len()) else { return false };
        let s =
            checksum::combine(checksum::pseudo_header_v4(src, dst, super::ipv4::protocol::TCP, len), checksum::sum(b));
        checksum::fold(s) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source port, updating the checksum.
    #[inline(always)]
    pub fn set_src_port(&mut self, port: u16) {
        let c = checksum::update16(self.checksum(), self.src_port(), port);
        let b = self.buffer.as_mut();
        set_be16(b, field::SRC_PORT, port);
        set_be16(b, field::CHECKSUM, c);
    }

    /// Sets the destination port, updating the checksum.
    #[inline(always)]
    pub fn set_dst_port(&mut self, port: u16) {
        let c = checksum::update16(self.checksum(), self.dst_port(), port);
        let b = self.buffer.as_mut();
        set_be16(b, field::DST_PORT, port);
        set_be16(b, field::CHECKSUM, c);
    }

    /// Updates the checksum for a pseudo-header address change (NAT of the
    /// enclosing IPv4 header).
    #[inline(always)]
    pub fn update_checksum_for_addr(&mut self, old: u32, new: u32) {
        let c = checksum::update32(self.checksum(), old, new);
        set_be16(self.buffer.as_mut(), field::CHECKSUM, c);
    }

    /// Writes a fresh checksum for the given pseudo-header addresses. The
    /// buffer must be exactly the segment.
    pub fn fill_checksum(&mut self, src: u32, dst: u32) {
        let b = self.buffer.as_mut();
        set_be16(b, field::CHECKSUM, 0);
        let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
        let s =
            checksum::combine(checksum::pseudo_header_v4(src, dst, super::ipv4::protocol::TCP, len), checksum::sum(b));
        set_be16(b, field::CHECKSUM, !checksum::fold(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment() -> Vec<u8> {
        // 40000 -> 80, SYN, window 64240, data offset 5, no payload.
        let mut v = vec![0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0];
        Packet::new_unchecked(&mut v[..]).fill_checksum(0xc612_0002, 0xc612_6401);
        v
    }

    #[test]
    fn parse() {
        let v = segment();
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.src_port(), 40000);
        assert_eq!(p.dst_port(), 80);
        assert_eq!(p.seq(), 1);
        assert_eq!(p.ack(), 0);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.flags(), flags::SYN);
        assert_eq!(p.window(), 64240);
        assert!(p.verify_checksum(0xc612_0002, 0xc612_6401));
        assert!(!p.verify_checksum(0xc612_0003, 0xc612_6401));
    }

    #[test]
    fn checksum_agrees_with_etherparse() {
        let v = segment();
        let (h, _) = etherparse::TcpHeader::from_slice(&v).unwrap();
        let expect = h.calc_checksum_ipv4_raw([198, 18, 0, 2], [198, 18, 100, 1], &[]).unwrap();
        assert_eq!(h.checksum, expect);
    }

    #[test]
    fn nat_rewrite_keeps_checksum_valid() {
        let mut v = segment();
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_dst_port(8080);
        p.update_checksum_for_addr(0xc612_6401, 0xc612_010b);
        p.set_src_port(1234);
        assert!(p.verify_checksum(0xc612_0002, 0xc612_010b));
    }

    #[test]
    fn rejects_bad_offsets() {
        let v = segment();
        assert_eq!(Packet::new_checked(&v[..19]).unwrap_err(), Error::Truncated);
        let mut bad = v.clone();
        bad[12] = 0x40; // 16-byte header
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
        let mut bad = v;
        bad[12] = 0x60; // 24-byte header in 20 bytes
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Truncated);
    }
}
