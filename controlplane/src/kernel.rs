//! The kernel side of the exception path: the addresses and routes of the
//! ports' kernel interfaces.
//!
//! Owns: what the kernel is told about the gateway's networks. The driver
//! creates each kernel interface with its port's MAC and MTU and brings it
//! up (`vipgate-dpdk`'s `exception` module); this module gives it the
//! port's addresses (so the kernel has the connected routes) and installs
//! every `[[routes]]` entry whose next hop is on a port with a kernel
//! interface, so the gateway's own traffic (health probes, BGP sessions to
//! a router) follows the same paths as the fast path. It runs iproute2's
//! `ip -batch -` at start and after a reload that changed the routes: a few
//! commands, never per packet, and the same tool an operator would use to
//! check the result. Must not touch DPDK.

use crate::config::Config;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use vipgate_dataplane::snapshot::RouteSpec;

/// Configuring a kernel interface failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// `ip` could not be run.
    #[error("cannot run `ip` (iproute2) to configure the kernel interfaces: {0}")]
    Spawn(std::io::Error),
    /// `ip` refused a command.
    #[error(
        "configuring the kernel interfaces failed: `ip -batch -` exited with {status}: {stderr}; commands were:\n{commands}"
    )]
    Failed {
        /// The exit status.
        status: std::process::ExitStatus,
        /// What `ip` said.
        stderr: String,
        /// The batch it was given.
        commands: String,
    },
}

/// The kernel interface a route's next hop is reached through: that of the
/// port whose subnet holds `via`, if the port has one.
fn interface_for(config: &Config, via: u32) -> Option<&str> {
    let kernel = config
        .dataplane
        .ports
        .iter()
        .map(|p| p.kernel_interface.as_deref())
        .chain(config.vlans.iter().map(|v| v.kernel_interface.as_deref()));
    config.ports().iter().zip(kernel).find_map(|(spec, iface)| {
        let on_link = spec.addresses.iter().any(|c| (c.addr ^ via) & vipgate_dataplane::route::Route::mask(c.len) == 0);
        if on_link { iface } else { None }
    })
}

fn route_command(verb: &str, r: &RouteSpec, iface: &str) -> String {
    format!(
        "route {verb} {}/{} via {} dev {iface}\n",
        Ipv4Addr::from(r.prefix.addr),
        r.prefix.len,
        Ipv4Addr::from(r.via)
    )
}

/// Gives every kernel interface its port's addresses and installs the
/// static routes whose next hop is on a port with a kernel interface.
/// Returns what it did, as `ip` commands (empty: no kernel interface).
pub fn configure(config: &Config) -> Result<String, KernelError> {
    let batch = configure_batch(config);
    run(&batch)?;
    Ok(batch)
}

/// The `ip -batch` commands [`configure`] runs.
fn configure_batch(config: &Config) -> String {
    let mut batch = String::new();
    for (spec, port) in config.ports().iter().zip(&config.dataplane.ports) {
        let Some(iface) = &port.kernel_interface else { continue };
        for c in &spec.addresses {
            batch.push_str(&format!("address replace {}/{} dev {iface}\n", Ipv4Addr::from(c.addr), c.len));
        }
        batch.push_str(&format!("link set dev {iface} up\n"));
    }
    // Each VLAN's kernel interface: a Linux VLAN interface on top of the
    // carrying port's (created with it at start, gone with it at exit), so
    // the kernel sends and receives the VLAN's frames tagged, as the fast
    // path punts and transmits them.
    let specs = &config.ports()[config.dataplane.ports.len()..];
    for (v, spec) in config.vlans.iter().zip(specs) {
        let (Some(iface), Some(parent)) =
            (&v.kernel_interface, config.dataplane.ports.get(v.port).and_then(|p| p.kernel_interface.as_ref()))
        else {
            continue;
        };
        batch.push_str(&format!("link add link {parent} name {iface} mtu {} type vlan id {}\n", spec.mtu, v.id));
        for c in &spec.addresses {
            batch.push_str(&format!("address replace {}/{} dev {iface}\n", Ipv4Addr::from(c.addr), c.len));
        }
        batch.push_str(&format!("link set dev {iface} up\n"));
    }
    for r in config.routes() {
        if let Some(iface) = interface_for(config, r.via) {
            batch.push_str(&route_command("replace", r, iface));
        }
    }
    batch
}

/// After a reload: removes the kernel routes of `old`'s static routes that
/// `new` no longer has, and installs (replaces) `new`'s. Returns the `ip`
/// commands it ran (empty when the routes did not change).
pub fn sync_routes(old: &Config, new: &Config) -> Result<String, KernelError> {
    if old.routes() == new.routes() {
        return Ok(String::new());
    }
    let mut removed = String::new();
    for r in old.routes() {
        if !new.routes().iter().any(|n| n.prefix == r.prefix)
            && let Some(iface) = interface_for(old, r.via)
        {
            removed.push_str(&route_command("del", r, iface));
        }
    }
    // A route someone already removed by hand is no reason to fail.
    if let Err(e) = run(&removed) {
        tracing::warn!("removing kernel routes the configuration no longer has: {e}");
    }
    let mut batch = String::new();
    for r in new.routes() {
        if let Some(iface) = interface_for(new, r.via) {
            batch.push_str(&route_command("replace", r, iface));
        }
    }
    run(&batch)?;
    removed.push_str(&batch);
    Ok(removed)
}

fn run(batch: &str) -> Result<(), KernelError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(KernelError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(batch.as_bytes()).map_err(KernelError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(KernelError::Spawn)?;
    if !out.status.success() {
        return Err(KernelError::Failed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            commands: batch.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[eal]
lcores = "0,1"
hugepages = false

[[ports]]
name = "trunk"
device = "net_tap0,iface=vgt-t"
addresses = ["198.18.0.1/24"]
kernel_interface = "vg-trunk"

[[vlans]]
name = "clients"
port = "trunk"
id = 100
addresses = ["198.18.10.1/24"]
mtu = 1400

[[vlans]]
name = "quiet"
port = "trunk"
id = 300
addresses = ["198.18.30.1/24"]
kernel_interface = ""

[[routes]]
prefix = "198.19.0.0/16"
via = "198.18.10.254"
"#;

    #[test]
    fn each_vlan_gets_a_linux_vlan_interface_on_its_ports_and_routes_through_it() {
        let config = Config::parse(std::path::Path::new("/etc/vipgate/k.toml"), CONFIG).unwrap();
        let batch = configure_batch(&config);
        let expected = "address replace 198.18.0.1/24 dev vg-trunk\n\
                        link set dev vg-trunk up\n\
                        link add link vg-trunk name clients mtu 1400 type vlan id 100\n\
                        address replace 198.18.10.1/24 dev clients\n\
                        link set dev clients up\n\
                        route replace 198.19.0.0/16 via 198.18.10.254 dev clients\n";
        assert_eq!(batch, expected);
    }
}
