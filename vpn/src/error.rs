//! What can go wrong, said so that the operator can act on it.

use lbs_netconfig::NetError;

/// A VPN error.
#[derive(Debug, thiserror::Error)]
pub enum VpnError {
    /// The configuration is wrong.
    #[error("VPN configuration: {0}")]
    Config(String),
    /// The kernel has no WireGuard module (the userspace backend works without it).
    #[error(
        "this kernel has no WireGuard module: use the userspace backend (`backend = \"userspace\"` or `auto`)"
    )]
    NoKernelModule,
    /// A WireGuard device refused or failed an operation.
    #[error("WireGuard interface {name}: {what}: {reason}")]
    Device {
        name: String,
        /// What was being done.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A network configuration step failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A file could not be read or written.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed (not a `source`: the message says it already).
        error: std::io::Error,
    },
}

impl VpnError {
    pub(crate) fn device(name: &str, what: impl Into<String>, reason: impl ToString) -> VpnError {
        VpnError::Device {
            name: name.to_owned(),
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
