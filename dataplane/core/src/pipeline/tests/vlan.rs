//! Tagged frames: no port carries a VLAN yet, so every 802.1Q or 802.1ad
//! tagged frame, one tag or stacked, is dropped as `unknown_vlan`; one for
//! another host's MAC is `other_host` first, as any frame.

use super::*;

/// `frame` (untagged) with `tags` inserted after its MAC addresses: each
/// (TPID, VLAN id).
fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    f
}

#[test]
fn tagged_frames_are_dropped_as_unknown_vlan_whatever_they_carry() {
    let mut r = Rig::resolved();
    r.pipe.set_kernel_ports(&[true, true]);
    let to_vip = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("802.1Q", tagged(&to_vip, &[(0x8100, 100)])),
        ("802.1ad", tagged(&to_vip, &[(0x88a8, 100)])),
        ("stacked", tagged(&to_vip, &[(0x88a8, 100), (0x8100, 200)])),
        ("priority tag, VLAN 0", tagged(&to_vip, &[(0x8100, 0)])),
        ("truncated tag", to_vip[..12].iter().copied().chain([0x81, 0x00, 0x00]).collect()),
    ];
    for (what, mut f) in cases {
        assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::UnknownVlan), "{what}");
    }
    assert_eq!(r.pipe.counters().drops(DropReason::UnknownVlan), 5);
    assert_eq!(r.pipe.counters().nat_forward.get(), 0, "nothing forwarded");
    // For another host: other_host, before the tag is looked at.
    let mut f = tagged(&to_vip, &[(0x8100, 100)]);
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::OtherHost));
    // The untagged frame is forwarded as ever.
    let mut f = to_vip.clone();
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
}
