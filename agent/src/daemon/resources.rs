//! The resource history of this machine (CPU, memory, disk, network), sampled on a timer.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::daemon::state::{Shared, lock};

pub(crate) async fn sample_resources(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut sampler = crate::resources::Sampler::new(shared.paths.dir.clone());
    loop {
        match sampler.sample() {
            Ok(Some(sample)) => {
                // A SQLite write (and its fsync): on a blocking thread.
                let recorder = shared.clone();
                let recorded =
                    tokio::task::spawn_blocking(move || lock(&recorder.resources).record(sample))
                        .await;
                match recorded {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::warn!("recording resources: {err:#}"),
                    Err(err) => tracing::warn!("recording resources: {err}"),
                }
            }
            Ok(None) => {}
            Err(err) => tracing::warn!("sampling resources: {err:#}"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(shared.config().resource_interval) => {}
        }
    }
}
