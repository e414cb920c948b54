//! Shared by the driver's tests: captures for net_pcap, the CPUs to place
//! lcores on, and the clean-up of a test's EAL runtime directory.

#![allow(dead_code)]

/// An IPv4 address from its octets, host byte order.
pub(crate) const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

/// The MAC net_pcap gives the first device a process creates
/// (02:70:63:61:70 is "pcap", then the device's index): the captures are
/// written before EAL starts, so their frames are addressed to it, and
/// [`port_specs`] checks that port "in" really has it.
pub(crate) const PCAP_PORT_MAC: [u8; 6] = [0x02, 0x70, 0x63, 0x61, 0x70, 0x00];

/// A classic libpcap file (Ethernet link type) of `frames`.
pub(crate) fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // Ethernet
    for (i, f) in frames.iter().enumerate() {
        for v in [i as u32, 0, f.len() as u32, f.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(f);
    }
    out
}

/// Removes a test's EAL runtime directory and its capture file when
/// dropped, also when the test panics.
pub(crate) struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.0));
        let _ = std::fs::remove_file(format!("/tmp/{}.pcap", self.0));
    }
}

/// CPUs this process may run on.
pub(crate) fn core_list() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
    let mut cpus = Vec::new();
    for part in line.split(':').nth(1).unwrap().trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap());
    }
    cpus
}

/// `n` client TCP segments (ACK, 6 bytes of payload) from 198.18.0.2 to the
/// VIP 198.18.100.1, from source ports 30000 on, to port `dport(i)`.
pub(crate) fn client_frames(n: u16, dport: impl Fn(u16) -> u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], PCAP_PORT_MAC)
                .ipv4([198, 18, 0, 2], [198, 18, 100, 1], 64)
                .tcp(30000 + i, dport(i), 1, 65535)
                .ack(1);
            let mut f = Vec::new();
            b.write(&mut f, &[0u8; 6]).unwrap();
            f
        })
        .collect()
}

/// Writes `frames` as the capture `/tmp/<prefix>.pcap` ([`Cleanup`] removes
/// it) and returns its path.
pub(crate) fn write_capture(prefix: &str, frames: &[Vec<u8>]) -> String {
    let path = format!("/tmp/{prefix}.pcap");
    std::fs::write(&path, pcap(frames)).unwrap();
    path
}

/// EAL arguments for a driver test: the main lcore on the first CPU this
/// process may use and `workers` worker lcores on the last, no hugepages,
/// port 0 a net_pcap replaying `capture` forever into `rx_queues` rx queues,
/// port 1 a net_null that receives nothing (by default its rx side would
/// fabricate packets from recycled mbufs).
pub(crate) fn eal_args(prefix: &str, workers: usize, rx_queues: usize, capture: &str) -> Vec<String> {
    let cpus = core_list();
    let last = cpus[cpus.len() - 1];
    let lcores: Vec<String> =
        std::iter::once(format!("0@{}", cpus[0])).chain((1..=workers).map(|l| format!("{l}@{last}"))).collect();
    let rx: String = (0..rx_queues).map(|_| format!("rx_pcap={capture},")).collect();
    [
        "--lcores",
        &lcores.join(","),
        "--no-huge",
        "-m",
        "256",
        "--no-pci",
        "--file-prefix",
        prefix,
        "--vdev",
        &format!("net_pcap0,{rx}infinite_rx=1"),
        "--vdev",
        "net_null0,no-rx=1",
        "--log-level",
        "*:warning",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The dataplane over the ports of [`eal_args`]: "in" (net_pcap0) and
/// "out" (net_null0).
pub(crate) fn pcap_to_null(
    mbufs: u32,
    pipeline: vipgate_dataplane::pipeline::PipelineConfig,
) -> vipgate_dpdk::DataplaneConfig {
    use vipgate_dpdk::PortConfig;
    vipgate_dpdk::DataplaneConfig {
        ports: vec![
            PortConfig { name: "in".into(), device: "net_pcap0".into(), bond: None, mtu: 1500, kernel_interface: None },
            PortConfig {
                name: "out".into(),
                device: "net_null0".into(),
                bond: None,
                mtu: 1500,
                kernel_interface: None,
            },
        ],
        mbufs,
        mbuf_cache: 128,
        idle_sleep_us: 0,
        pipeline,
    }
}

/// The snapshot's view of those ports, with their real MACs: "in" on
/// 198.18.0.1/24, "out" on 198.18.1.1/24.
///
/// # Panics
/// If "in" does not have [`PCAP_PORT_MAC`], the MAC the captures' frames
/// are addressed to (the pipeline would drop them all as another host's).
pub(crate) fn port_specs(
    macs: &[vipgate_dataplane::wire::EthernetAddress],
) -> Vec<vipgate_dataplane::snapshot::PortSpec> {
    use vipgate_dataplane::snapshot::{Ipv4Cidr, PortSpec};
    assert_eq!(macs[0].0, PCAP_PORT_MAC, "port \"in\" (net_pcap0) has another MAC than its captures' frames are for");
    [("in", 0), ("out", 1)]
        .iter()
        .map(|&(name, i)| PortSpec {
            name: name.into(),
            mac: macs[i],
            addresses: vec![Ipv4Cidr { addr: ip(198, 18, i as u8, 1), len: 24 }],
            mtu: 1500,
            vlan: None,
        })
        .collect()
}

/// Permanent neighbours for the backends 198.18.1.`h`, so no packet waits
/// for ARP.
pub(crate) fn backend_neighbours(
    hosts: impl IntoIterator<Item = u8>,
) -> Vec<vipgate_dataplane::snapshot::NeighbourSpec> {
    hosts
        .into_iter()
        .map(|h| vipgate_dataplane::snapshot::NeighbourSpec {
            addr: ip(198, 18, 1, h),
            mac: vipgate_dataplane::wire::EthernetAddress([2, 0xbb, 0, 0, 0, h]),
        })
        .collect()
}
