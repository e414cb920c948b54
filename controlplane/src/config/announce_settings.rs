//! The `[announce]` section's settings, validated: which interface the
//! VIPs are announced on and how long a withdrawal is held down. The
//! configuration holds them; [`crate::announce`] acts on them.

use std::time::Duration;

/// Default `[announce] interface`.
pub const DEFAULT_INTERFACE: &str = "vipgate0";
/// Default `[announce] hold_down`.
pub const DEFAULT_HOLD_DOWN: Duration = Duration::from_secs(10);
/// Largest `[announce] hold_down`.
pub const MAX_HOLD_DOWN: Duration = Duration::from_secs(3600);
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME: usize = 15;

/// The `[announce]` section, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceSettings {
    /// Whether vipgated manages the interface at all.
    pub enabled: bool,
    /// The interface's name.
    pub interface: String,
    /// The kind of interface created.
    pub kind: InterfaceKind,
    /// How long a VIP stays announced after it stopped being eligible.
    pub hold_down: Duration,
}

impl Default for AnnounceSettings {
    fn default() -> Self {
        AnnounceSettings {
            enabled: false,
            interface: DEFAULT_INTERFACE.to_owned(),
            kind: InterfaceKind::Dummy,
            hold_down: DEFAULT_HOLD_DOWN,
        }
    }
}

/// The kind of link the VIPs are put on. Both take no traffic and are
/// always up (carrier on), which is what the routing daemons need to treat
/// the addresses as connected routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceKind {
    /// `dummy`: the usual choice.
    Dummy,
    /// `ifb` (intermediate functional block): for kernels built without the
    /// dummy driver; it behaves the same for this purpose.
    Ifb,
}

impl InterfaceKind {
    /// The kernel's name of the kind, as `ip link` shows it.
    pub fn name(self) -> &'static str {
        match self {
            InterfaceKind::Dummy => "dummy",
            InterfaceKind::Ifb => "ifb",
        }
    }

    /// Parses `dummy` or `ifb`.
    pub fn parse(s: &str) -> Result<InterfaceKind, String> {
        match s {
            "dummy" => Ok(InterfaceKind::Dummy),
            "ifb" => Ok(InterfaceKind::Ifb),
            other => Err(format!(
                "{other:?} is not an interface kind: use \"dummy\" (or \"ifb\" on kernels without the dummy driver)"
            )),
        }
    }
}

/// Checks an interface name the way the kernel would, so a bad name is a
/// configuration error rather than a netlink one.
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Err(format!("{name:?} is longer than {MAX_INTERFACE_NAME} bytes, the kernel's limit"));
    }
    if name == "." || name == ".." || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{name:?} is not a valid interface name (no '/', ':', spaces; not \".\" or \"..\")"));
    }
    Ok(())
}
