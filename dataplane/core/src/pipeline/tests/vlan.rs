//! 802.1Q VLANs: tagged frames of a VLAN a port carries are processed on
//! the VLAN's interface and leave tagged with their egress interface's
//! VLAN; frames of VLANs no port carries, and stacked tags, are dropped as
//! `unknown_vlan`; what is handed over or punted leaves as it came.

use super::*;
use crate::snapshot::VlanSpec;

const GW_V100: u32 = ip(198, 18, 10, 1);
const GW_V200: u32 = ip(198, 18, 20, 1);
const V_CLIENT: u32 = ip(198, 18, 10, 2);
const V_BACKENDS: [u32; 3] = [ip(198, 18, 20, 11), ip(198, 18, 20, 12), ip(198, 18, 20, 13)];
const V_CLIENT_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 10];
const V_BACKEND_MACS: [[u8; 6]; 3] = [[0x02, 0xbb, 0, 0, 0, 21], [0x02, 0xbb, 0, 0, 0, 22], [0x02, 0xbb, 0, 0, 0, 23]];

/// `frame` (untagged) with `tags` inserted after its MAC addresses: each
/// (TPID, TCI).
fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    f
}

/// The VLAN id of a frame with one 802.1Q tag, and the frame without it.
fn untagged(frame: &[u8]) -> (u16, Vec<u8>) {
    assert_eq!(&frame[12..14], &[0x81, 0x00], "tagged 802.1Q");
    let vid = u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff;
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&frame[16..]);
    (vid, f)
}

/// The base spec plus VLAN 100 on the client port (198.18.10.1/24) and
/// VLAN 200 on the backend port (198.18.20.1/24), whose backends serve
/// the dns and web services.
fn vlan_spec() -> SnapshotSpec {
    let mut s = spec();
    let vlan = |name: &str, port, id, addr| PortSpec {
        name: name.into(),
        mac: EthernetAddress::default(),
        addresses: vec![Ipv4Cidr { addr, len: 24 }],
        mtu: 1500,
        vlan: Some(VlanSpec { port, id }),
    };
    s.ports.push(vlan("v100", 0, 100, GW_V100));
    s.ports.push(vlan("v200", 1, 200, GW_V200));
    for svc in &mut s.services {
        let svc = Arc::make_mut(svc);
        for (b, addr) in svc.backends.iter_mut().zip(V_BACKENDS) {
            b.addr = addr;
            b.stats_slot = slot_of(addr, b.port);
        }
    }
    s
}

const V100: u16 = 2;
const V200: u16 = 3;

/// A rig on [`vlan_spec`] whose VLAN neighbours are resolved with tagged
/// ARP replies.
fn vlan_rig() -> Rig {
    let mut r = Rig::new();
    r.snap = Snapshot::build(&vlan_spec()).unwrap();
    let teach = |r: &mut Rig, port: u16, vid: u16, addr: u32, mac: [u8; 6], ours: u32| {
        let dev_mac = r.snap.ports()[usize::from(port)].mac.0;
        let f = tagged(&arp_frame(2, mac, addr, dev_mac, ours), &[(0x8100, vid)]);
        let (v, _) = r.run_with_headroom(port, &f, 64);
        assert_eq!(v, Verdict::Consumed, "ARP reply from {addr:#x} on VLAN {vid}");
        assert_eq!(r.pipe.neighbours().get(addr), Some(mac));
    };
    teach(&mut r, 0, 100, V_CLIENT, V_CLIENT_MAC, GW_V100);
    for (a, m) in V_BACKENDS.iter().zip(V_BACKEND_MACS) {
        teach(&mut r, 1, 200, *a, m, GW_V200);
    }
    r
}

fn to_dev(port: u16, f: Vec<u8>) -> Vec<u8> {
    to_mac([GW_C, GW_B][usize::from(port)], f)
}

#[test]
fn a_vlan_interface_has_its_ports_mac_and_its_own_addresses() {
    let snap = Snapshot::build(&vlan_spec()).unwrap();
    assert_eq!(snap.devices(), 2);
    assert!(snap.has_vlans());
    assert_eq!(snap.vlan_interface(0, 100), Some(V100));
    assert_eq!(snap.vlan_interface(1, 200), Some(V200));
    assert_eq!((snap.vlan_interface(0, 200), snap.vlan_interface(1, 100)), (None, None));
    assert_eq!(snap.ports()[usize::from(V100)].mac.0, GW_C);
    assert_eq!(snap.ports()[usize::from(V200)].mac.0, GW_B);
    // Bad VLAN interfaces are refused, naming what is wrong.
    for (what, port, id, expect) in [
        ("carried by a VLAN", 2u16, 300u16, "not a port without a VLAN"),
        ("id 0", 0, 0, "not from 1 to 4094"),
        ("id 4095", 0, 4095, "not from 1 to 4094"),
        ("twice", 0, 100, "already on port 0"),
    ] {
        let mut s = vlan_spec();
        s.ports.push(PortSpec {
            name: "bad".into(),
            mac: EthernetAddress::default(),
            addresses: vec![Ipv4Cidr { addr: ip(198, 18, 30, 1), len: 24 }],
            mtu: 1500,
            vlan: Some(VlanSpec { port, id }),
        });
        let e = Snapshot::build(&s).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(expect), "{what}: {e}");
    }
}

#[test]
fn a_client_on_one_vlan_reaches_backends_on_another_and_the_replies_come_back_tagged() {
    let mut r = vlan_rig();
    let mut seen = std::collections::HashSet::new();
    for sport in 40000..40030u16 {
        let f = tagged(&to_dev(0, tcp_frame((V_CLIENT, sport), (VIP, 80), 64, b"hello")), &[(0x8100, 100)]);
        let (v, out) = r.run_with_headroom(0, &f, 64);
        assert_eq!(v, Verdict::Transmit(1), "out of the backend port's device");
        let (vid, inner) = untagged(&out);
        assert_eq!(vid, 200, "tagged with the backends' VLAN");
        let (esrc, edst, src, dst, ttl, _, dport) = inspect(&inner);
        let b = V_BACKENDS.iter().position(|&a| a == dst).expect("to a backend");
        assert_eq!((esrc, edst, src, ttl, dport), (GW_B, V_BACKEND_MACS[b], V_CLIENT, 63, 8080));
        seen.insert(dst);
        // The backend's reply, tagged 200, goes back tagged 100.
        let reply = tagged(&to_dev(1, tcp_frame((dst, 8080), (V_CLIENT, sport), 64, b"world")), &[(0x8100, 200)]);
        let (v, out) = r.run_with_headroom(1, &reply, 64);
        assert_eq!(v, Verdict::Transmit(0));
        let (vid, inner) = untagged(&out);
        let (esrc, edst, src, dst, _, sport2, _) = inspect(&inner);
        assert_eq!((vid, esrc, edst, src, dst, sport2), (100, GW_C, V_CLIENT_MAC, VIP, V_CLIENT, 80));
    }
    assert_eq!(seen.len(), 3, "every backend used");
    assert_eq!(r.pipe.counters().total_drops(), 0);
}

#[test]
fn an_untagged_client_reaches_tagged_backends() {
    let mut r = vlan_rig();
    r.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
    let f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    let (v, out) = r.run_with_headroom(0, &f, 64);
    assert_eq!(v, Verdict::Transmit(1));
    assert_eq!(untagged(&out).0, 200);
    // Without 4 bytes of headroom it cannot be tagged.
    let (v, _) = r.run_with_headroom(0, &tcp_frame((CLIENT, 40001), (VIP, 80), 64, b""), 0);
    assert_eq!(v, Verdict::Drop(DropReason::NoHeadroom));
}

#[test]
fn arp_on_a_vlan_is_answered_on_it_and_next_hops_behind_it_are_solicited_tagged() {
    let mut r = vlan_rig();
    for target in [GW_V100, VIP] {
        let req = tagged(&arp_frame(1, V_CLIENT_MAC, V_CLIENT, [0; 6], target), &[(0x8100, 100)]);
        let (v, out) = r.run_with_headroom(0, &req, 64);
        assert_eq!(v, Verdict::Transmit(0), "ARP for {target:#x}");
        let (vid, inner) = untagged(&out);
        assert_eq!(vid, 100);
        let a = arp::Packet::new_checked(&inner[14..]).unwrap();
        assert_eq!((a.operation(), a.sender_ip(), a.target_ip()), (arp::Operation::Reply, target, V_CLIENT));
        assert_eq!(a.sender_hw(), EthernetAddress(GW_C));
    }
    // An ARP request on VLAN 100 for the VLAN 200 address is not ours there.
    let req = tagged(&arp_frame(1, V_CLIENT_MAC, V_CLIENT, [0; 6], GW_V200), &[(0x8100, 100)]);
    assert!(matches!(r.run_with_headroom(0, &req, 64).0, Verdict::Drop(_)));
    // A next hop behind VLAN 200 is solicited out of device 1, tagged 200.
    let mut r = Rig::new();
    r.snap = Snapshot::build(&vlan_spec()).unwrap();
    r.pipe.housekeeping(&r.snap, r.now);
    let s: Vec<Solicitation> = r.pipe.take_solicitations().collect();
    let b = s.iter().find(|s| s.target_ip == V_BACKENDS[0]).expect("the backend is solicited");
    assert_eq!((b.port, b.vlan, b.sender_ip, b.sender_mac), (1, Some(200), GW_V200, EthernetAddress(GW_B)));
    let mut buf = [0u8; 64];
    let len = arp::emit_request_frame_on(&mut buf, b.sender_mac, b.sender_ip, b.target_ip, b.vlan).unwrap();
    let (vid, inner) = untagged(&buf[..len]);
    assert_eq!(vid, 200);
    let a = arp::Packet::new_checked(&inner[14..]).unwrap();
    assert_eq!((a.operation(), a.sender_ip(), a.target_ip()), (arp::Operation::Request, GW_V200, V_BACKENDS[0]));
}

#[test]
fn unknown_vlans_and_stacked_tags_are_dropped_and_counted() {
    let mut r = vlan_rig();
    r.pipe.set_kernel_ports(&[true, true]);
    let to_vip = to_dev(0, tcp_frame((V_CLIENT, 40000), (VIP, 80), 64, b""));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a VLAN no port carries", tagged(&to_vip, &[(0x8100, 300)])),
        ("VLAN 200, carried by the other port", tagged(&to_vip, &[(0x8100, 200)])),
        ("802.1ad", tagged(&to_vip, &[(0x88a8, 100)])),
        ("stacked", tagged(&to_vip, &[(0x8100, 100), (0x8100, 100)])),
        ("stacked, 802.1ad outside", tagged(&to_vip, &[(0x88a8, 100), (0x8100, 100)])),
    ];
    for (what, f) in &cases {
        assert_eq!(r.run_with_headroom(0, f, 64).0, Verdict::Drop(DropReason::UnknownVlan), "{what}");
    }
    assert_eq!(r.pipe.counters().drops(DropReason::UnknownVlan), cases.len() as u64);
    // A truncated tag is malformed.
    let f: Vec<u8> = to_vip[..12].iter().copied().chain([0x81, 0x00, 0x00]).collect();
    assert_eq!(r.run_with_headroom(0, &f, 64).0, Verdict::Drop(DropReason::Malformed));
    // For another host: other_host, before the tag is looked at.
    let mut f = tagged(&to_vip, &[(0x8100, 100)]);
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    assert_eq!(r.run_with_headroom(0, &f, 64).0, Verdict::Drop(DropReason::OtherHost));
    // A priority tag (VLAN 0) is the port's own, untagged network.
    let mut r = vlan_rig();
    r.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
    let f = tagged(&tcp_frame((CLIENT, 40000), (VIP, 80), 64, b""), &[(0x8100, 0xa000)]);
    assert_eq!(r.run_with_headroom(0, &f, 64).0, Verdict::Transmit(1));
}

#[test]
fn what_is_punted_or_handed_over_leaves_tagged_as_it_came() {
    let mut r = vlan_rig();
    r.pipe.set_kernel_ports(&[true, true]);
    // SSH to the gateway's VLAN address: punted to the device's kernel
    // interface, tag and PCP kept, byte for byte.
    let f = tagged(&to_dev(0, tcp_frame((V_CLIENT, 40000), (GW_V100, 22), 64, b"ssh")), &[(0x8100, 0x6064)]);
    let (v, out) = r.run_with_headroom(0, &f, 64);
    assert_eq!((v, out), (Verdict::Punt(0), f.clone()));
    // BGP on the VLAN is control traffic.
    let f = tagged(&to_dev(0, tcp_frame((V_CLIENT, 40000), (GW_V100, 179), 64, b"")), &[(0x8100, 100)]);
    assert_eq!(r.run_with_headroom(0, &f, 64).0, Verdict::PuntControl(0));
    // Two workers: a packet of the other worker's flow is handed over
    // unchanged, and the owner forwards it.
    let mut rigs = [vlan_rig(), vlan_rig()];
    for (w, r) in rigs.iter_mut().enumerate() {
        r.pipe.set_worker(w, 2);
    }
    let mut handed = 0;
    for sport in 1000..1050u16 {
        let f = tagged(&to_dev(0, tcp_frame((V_CLIENT, sport), (VIP, 80), 64, b"")), &[(0x8100, 100)]);
        let (v, _, out, h) = super::modes::deliver(&mut rigs, 0, 0, &f);
        handed += usize::from(h);
        assert_eq!(v, Verdict::Transmit(1));
        assert_eq!(untagged(&out).0, 200);
    }
    assert!(handed > 0, "some flows are the other worker's");
}

proptest! {
    /// Whatever follows an 802.1Q or 802.1ad tag, on either device, the
    /// pipeline does not panic and every frame is counted once.
    #[test]
    fn arbitrary_tagged_frames_never_panic_and_are_counted(
        tags in proptest::collection::vec((prop_oneof![Just(0x8100u16), Just(0x88a8u16), any::<u16>()], any::<u16>()), 1..3),
        inner in 0u8..4,
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        port in 0u16..2,
    ) {
        let mut r = vlan_rig();
        r.pipe.set_kernel_ports(&[true, false]);
        let base = match inner {
            0 => to_dev(port, tcp_frame((V_CLIENT, 40000), (VIP, 80), 64, &tail)),
            1 => to_dev(port, udp_frame((V_BACKENDS[0], 5353), (V_CLIENT, 40000), 64, &tail)),
            2 => arp_frame(1, V_CLIENT_MAC, V_CLIENT, [0; 6], GW_V100),
            _ => {
                let mut f = to_dev(port, vec![0; 14]);
                f.extend_from_slice(&tail);
                f
            }
        };
        let mut f = tagged(&base, &tags);
        f[..6].copy_from_slice(&[GW_C, GW_B][usize::from(port)]);
        let before = r.pipe.counters().total_drops() + r.pipe.counters().consumed.get();
        let (v, _) = r.run_with_headroom(port, &f, 64);
        let c = r.pipe.counters();
        match v {
            Verdict::Drop(_) | Verdict::Consumed => prop_assert_eq!(c.total_drops() + c.consumed.get(), before + 1),
            Verdict::Transmit(p) => prop_assert!(p < 2, "a device, never a VLAN interface: {}", p),
            Verdict::Punt(p) | Verdict::PuntControl(p) => prop_assert_eq!(p, port),
            Verdict::Handoff(_) => prop_assert!(false, "one worker never hands over"),
        }
    }
}
