//! ICMPv4 (RFC 792): the header, echo fields and the checksum.

use super::{Error, Field, Result, be16, set_be16};
use crate::checksum;

mod field {
    use super::Field;
    pub(super) const TYPE_CODE: Field = 0..2;
    pub(super) const CHECKSUM: Field = 2..4;
    pub(super) const IDENT: Field = 4..6;
    pub(super) const SEQ: Field = 6..8;
}

/// Header length (type, code, checksum and the 4-byte rest-of-header).
pub const HEADER_LEN: usize = 8;

/// ICMP message types used by vipgate.
pub mod message {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
}

super::view! {
    #[inline] =>
    /// A view of an ICMP message (the whole IP payload).
    Packet
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks the buffer holds the 8-byte header.
    #[inline]
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN { Err(Error::Truncated) } else { Ok(()) }
    }

    /// Message type.
    #[inline]
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[0]
    }

    /// Message code.
    #[inline]
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[1]
    }

    /// Checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Echo identifier (echo messages only).
    pub fn echo_ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Echo sequence number (echo messages only).
    pub fn echo_seq(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SEQ)
    }

    /// True if the checksum over the whole message verifies.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.buffer.as_ref())) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets type and code, updating the checksum incrementally.
    #[inline]
    pub fn set_type_code(&mut self, msg_type: u8, code: u8) {
        let b = self.buffer.as_mut();
        let old = be16(b, field::TYPE_CODE);
        let new = u16::from_be_bytes([msg_type, code]);
        let c = checksum::update16(be16(b, field::CHECKSUM), old, new);
        set_be16(b, field::TYPE_CODE, new);
        set_be16(b, field::CHECKSUM, c);
    }

    /// Writes a fresh checksum over the whole message.
    pub fn fill_checksum(&mut self) {
        let b = self.buffer.as_mut();
        set_be16(b, field::CHECKSUM, 0);
        let c = checksum::checksum(b);
        set_be16(b, field::CHECKSUM, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_request() -> Vec<u8> {
        let mut v = vec![8, 0, 0, 0, 0x12, 0x34, 0x00, 0x07];
        v.extend_from_slice(b"abcdefgh");
        Packet::new_unchecked(&mut v[..]).fill_checksum();
        v
    }

    #[test]
    fn parse() {
        let v = echo_request();
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.msg_type(), message::ECHO_REQUEST);
        assert_eq!(p.code(), 0);
        assert_eq!(p.echo_ident(), 0x1234);
        assert_eq!(p.echo_seq(), 7);
        assert!(p.verify_checksum());
        let (h, payload) = etherparse::Icmpv4Header::from_slice(&v).unwrap();
        assert_eq!(h.checksum, h.icmp_type.calc_checksum(payload));
    }

    #[test]
    fn echo_reply_rewrite() {
        let mut v = echo_request();
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_type_code(message::ECHO_REPLY, 0);
        assert!(p.verify_checksum());
        let (h, payload) = etherparse::Icmpv4Header::from_slice(&v).unwrap();
        assert!(matches!(h.icmp_type, etherparse::Icmpv4Type::EchoReply(_)));
        assert_eq!(h.checksum, h.icmp_type.calc_checksum(payload));
    }

    #[test]
    fn truncated() {
        assert_eq!(Packet::new_checked(&[8u8, 0, 0][..]).unwrap_err(), Error::Truncated);
    }
}
