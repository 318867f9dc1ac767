//! Which WireGuard backend runs: the one the operator chose, or the kernel module when it is
//! there and userspace otherwise.

use std::sync::Arc;

use crate::error::VpnError;
use crate::wg::{BackendChoice, WireGuard};

/// Opens the backend the operator chose. `Auto` tries the kernel module by creating (and
/// removing) an interface of its own and falls back to userspace when the kernel has none.
pub fn open_backend(choice: BackendChoice) -> Result<Arc<dyn WireGuard>, VpnError> {
    match choice {
        BackendChoice::Userspace => Ok(Arc::new(crate::userspace::Userspace::new())),
        BackendChoice::Kernel => Ok(Arc::new(crate::kernel::Kernel::new())),
        BackendChoice::Auto => {
            let kernel = crate::kernel::Kernel::new();
            // A name nobody else uses: this process's.
            let trial = format!("lbswg{}", std::process::id());
            match kernel.create(&trial) {
                Ok(()) => {
                    kernel.destroy(&trial)?;
                    Ok(Arc::new(kernel))
                }
                Err(VpnError::NoKernelModule) => {
                    tracing::info!("no WireGuard kernel module: using userspace WireGuard");
                    Ok(Arc::new(crate::userspace::Userspace::new()))
                }
                Err(err) => Err(err),
            }
        }
    }
}
