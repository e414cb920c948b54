//! IEEE 802.1Q VLAN tags (the 4 bytes after the outer EtherType).

use super::{Error, Field, Result, be16, set_be16};

mod field {
    use super::Field;
    pub(super) const TCI: Field = 0..2;
    pub(super) const ETHERTYPE: Field = 2..4;
    pub(super) const PAYLOAD: usize = 4;
}

/// Length of a VLAN tag.
pub const HEADER_LEN: usize = field::PAYLOAD;

super::view! {
    #[inline] =>
    /// A view of an 802.1Q tag and what follows it.
    Tag
}

impl<T: AsRef<[u8]>> Tag<T> {
    /// Checks the buffer holds a whole tag.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN { Err(Error::Truncated) } else { Ok(()) }
    }

    /// VLAN identifier (12 bits).
    pub fn vid(&self) -> u16 {
        be16(self.buffer.as_ref(), field::TCI) & 0x0fff
    }

    /// Priority code point (3 bits).
    pub fn pcp(&self) -> u8 {
        (be16(self.buffer.as_ref(), field::TCI) >> 13) as u8
    }

    /// Drop-eligible indicator.
    pub fn dei(&self) -> bool {
        be16(self.buffer.as_ref(), field::TCI) & 0x1000 != 0
    }

    /// EtherType of the encapsulated payload.
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ETHERTYPE)
    }

    /// Bytes after the tag.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Tag<T> {
    /// Sets priority, drop eligibility and VLAN id.
    pub fn set_tci(&mut self, pcp: u8, dei: bool, vid: u16) {
        let tci = (u16::from(pcp & 7) << 13) | (u16::from(dei) << 12) | (vid & 0x0fff);
        set_be16(self.buffer.as_mut(), field::TCI, tci);
    }

    /// Sets the inner EtherType.
    pub fn set_ethertype(&mut self, t: u16) {
        set_be16(self.buffer.as_mut(), field::ETHERTYPE, t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_emit() {
        let bytes = [0xb0, 0x64, 0x08, 0x00, 0x45];
        let t = Tag::new_checked(&bytes[..]).unwrap();
        assert_eq!(t.pcp(), 5);
        assert!(t.dei());
        assert_eq!(t.vid(), 100);
        assert_eq!(t.ethertype(), 0x0800);
        assert_eq!(t.payload(), &[0x45]);

        let mut out = [0u8; 4];
        let mut t = Tag::new_unchecked(&mut out[..]);
        t.set_tci(5, true, 100);
        t.set_ethertype(0x0800);
        assert_eq!(out, bytes[..4]);
    }

    #[test]
    fn truncated() {
        assert_eq!(Tag::new_checked(&[0u8; 3][..]).unwrap_err(), Error::Truncated);
    }
}
